`timescale 1ns/1ps
`default_nettype none
// Lane dispatcher: decides from the activation code alone which PE path handles a channel pair.
// HLUQ codes below n_log are the log region (shift path); the test is a comparator so any n_log works,
// and with n_log = 2^(bits-1) it reduces to the code's MSB. Uniform/CAG codes always use the multiplier,
// with the zero point of the beat's group subtracted first (so no weight sums are needed for it).
module lane_dispatch #(
    parameter integer XB = 8  // activation code bits held per lane
) (
    input  wire [XB-1:0] code,
    input  wire          hluq,
    input  wire [XB:0]   n_log,
    input  wire [XB-1:0] zero,      // uniform/CAG zero point of the beat's group
    output wire          to_shift,  // HLUQ log region
    output wire          is_zero,   // log-region code 0 decodes to x_min: no shift term
    output wire [XB:0]   mul_op,    // signed multiplier operand: q - zero, or HLUQ level j = code - n_log + 1
    output wire [XB:0]   shift_k    // shift-lane right shift: n_log - 1 - code
);
`ifndef SYNTHESIS
  initial if (XB < 2 || XB > 16) $fatal(1, "lane_dispatch: XB=%0d outside 2..16", XB);
`endif
  wire [XB:0] code_w = {1'b0, code};
  assign to_shift = hluq && (code_w < n_log);
  assign is_zero  = (code == {XB{1'b0}});
  assign mul_op   = to_shift ? {(XB + 1){1'b0}} : (hluq ? code_w - n_log + 1'b1 : code_w - {1'b0, zero});
  assign shift_k  = n_log - 1'b1 - code_w;
endmodule
`default_nettype wire
