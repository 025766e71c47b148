`timescale 1ns/1ps
`default_nettype none
// One PE lane with both HLUQ paths: an integer multiplier (uniform region, uniform/CAG inputs) and a
// shift path that keeps F fraction bits. For a log-region code it gives floor(W*2^(F-k)); for a
// uniform-region code it passes W*2^F (shift 0), which is the s1 offset of that entry on the same s1*2^-F
// scale, so the data-dependent weight sum needs no adder tree of its own.
module pe_lane #(
    parameter integer XB = 8,   // activation code bits
    parameter integer WB = 9,   // signed weight bits (code minus zero point)
    parameter integer F  = 16   // fraction bits of the shift path
) (
    input  wire                    to_shift,
    input  wire                    is_zero,
    input  wire [XB:0]             mul_op,   // two's complement, XB+1 bits
    input  wire [XB:0]             shift_k,
    input  wire signed [WB-1:0]    w,
    output wire signed [XB+WB:0]   prod,     // mul_op * w
    output wire signed [WB+F-1:0]  shifted   // log region: floor(w * 2^(F - shift_k)) (0 for code 0); else w * 2^F
);
`ifndef SYNTHESIS
  initial if (WB < 2 || F < 0 || F > 32) $fatal(1, "pe_lane: WB=%0d F=%0d out of range", WB, F);
`endif
  wire signed [XB+WB:0] op_ext = {{WB{mul_op[XB]}}, mul_op};
  wire signed [XB+WB:0] w_ext  = {{(XB + 1){w[WB-1]}}, w};
  assign prod = op_ext * w_ext;
  wire signed [WB+F-1:0] w_frac;
  generate
    if (F > 0) begin : g_frac
      assign w_frac = {w, {F{1'b0}}};
    end else begin : g_nofrac
      assign w_frac = w;
    end
  endgenerate
  // every arm signed, or the conditional turns >>> into a logical shift
  assign shifted = !to_shift ? w_frac : (is_zero ? $signed({(WB + F){1'b0}}) : (w_frac >>> shift_k));
endmodule
`default_nettype wire
