`timescale 1ns/1ps
`default_nettype none
// Integer dequant/requant pipeline. Stage A (one shared multiplier, one slot per cycle) puts every
// accumulator slot on a common grid: D = sum_k rhu(ACC_k * m_k, e_k). Stage B applies the per-output
// multiplier, folded bias/zero point and shift with round-half-up, then saturates:
// out = clamp(rhu(D * M_o + C_o, n_o), qmin, qmax), rhu(v, e) = (v + 2^(e-1)) >>> e.
module requant #(
    parameter integer NS = 8,    // accumulator slots
    parameter integer SW = 48,   // accumulator bits
    parameter integer MB = 16,   // slot mantissa bits
    parameter integer EB = 6,    // slot shift bits
    parameter integer DW = 64,   // common-grid sum bits
    parameter integer VW = 112,  // requant product / bias bits
    parameter integer OW = 32,   // output bits
    parameter integer AW = 20
) (
    input  wire               clk,
    input  wire               rst,
    input  wire               load,
    input  wire               load_last,
    input  wire [NS*SW-1:0]   acc_in,
    input  wire [15:0]        o_in,
    input  wire [AW-1:0]      oaddr_in,
    input  wire [3:0]         n_slots,
    input  wire [NS*MB-1:0]   slot_mant,
    input  wire [NS*EB-1:0]   slot_shift,
    output wire [15:0]        p_addr,      // per-output constants, read one cycle later on p_data
    input  wire [VW+39:0]     p_data,      // {C_o[VW-1:0], n_o[7:0], M_o[31:0]}
    input  wire signed [31:0] qmin,
    input  wire signed [31:0] qmax,
    output reg                out_we,
    output reg                out_last,
    output reg  [AW-1:0]      out_addr,
    output reg  [OW-1:0]      out_data
);
`ifndef SYNTHESIS
  initial if (NS < 1 || NS > 8 || EB > 6 || OW > 32 || DW + 33 > VW)
    $fatal(1, "requant: inconsistent widths NS=%0d EB=%0d DW=%0d VW=%0d OW=%0d", NS, EB, DW, VW, OW);
`endif
  reg  [NS*SW-1:0] acc_r;
  reg  [3:0]       k;
  reg              a_busy, a_last;
  reg  [15:0]      a_o;
  reg  [AW-1:0]    a_oaddr;
  reg  signed [DW-1:0] d_sum;
  assign p_addr = a_o;

  // stage A: one slot term per cycle
  wire signed [SW-1:0]    acc_k  = acc_r[k[2:0]*SW +: SW];
  wire [MB-1:0]           mant_k = slot_mant[k[2:0]*MB +: MB];
  wire [EB-1:0]           sh_k   = slot_shift[k[2:0]*EB +: EB];
  wire signed [SW+MB+1:0] prod_k = {{(MB + 2){acc_k[SW-1]}}, acc_k} * $signed({{(SW + 2){1'b0}}, mant_k});
  wire [SW+MB+1:0]        half_k = ({{(SW + MB + 1){1'b0}}, 1'b1} << sh_k) >> 1;
  // the rounded term fits DW bits by construction (checked by the golden model): drop the top bits
  /* verilator lint_off UNUSEDSIGNAL */
  wire signed [SW+MB+1:0] term_k = (prod_k + $signed(half_k)) >>> sh_k;
  /* verilator lint_on UNUSEDSIGNAL */
  wire signed [DW-1:0]    d_next = d_sum + term_k[DW-1:0];
  wire                    a_done = a_busy && (k == n_slots - 4'd1);

  // stage B: per-output multiplier, bias and shift, then saturation
  reg               b_valid, b_last;
  reg  [AW-1:0]     b_oaddr;
  reg  signed [DW-1:0] b_d;
  wire [31:0]       m_o = p_data[31:0];
  wire [7:0]        n_o = p_data[39:32];
  wire signed [VW:0] c_o = {p_data[VW+39], p_data[VW+39:40]};
  wire signed [VW:0] v   = {{(VW - DW + 1){b_d[DW-1]}}, b_d} * $signed({{(VW - 31){1'b0}}, m_o}) + c_o;
  wire [VW:0]        half_o = ({{VW{1'b0}}, 1'b1} << n_o) >> 1;
  wire signed [VW:0] r   = (v + $signed(half_o)) >>> n_o;
  wire signed [VW:0] lo  = {{(VW - 31){qmin[31]}}, qmin};
  wire signed [VW:0] hi  = {{(VW - 31){qmax[31]}}, qmax};
  // after saturation to [qmin, qmax] only the low OW bits carry information
  /* verilator lint_off UNUSEDSIGNAL */
  wire signed [VW:0] sat = (r < lo) ? lo : ((r > hi) ? hi : r);
  /* verilator lint_on UNUSEDSIGNAL */

  always @(posedge clk) begin
    if (rst) begin
      a_busy <= 1'b0;
      a_last <= 1'b0;
      k <= 4'd0;
      d_sum <= {DW{1'b0}};
      acc_r <= {(NS * SW){1'b0}};
      a_o <= 16'd0;
      a_oaddr <= {AW{1'b0}};
      b_valid <= 1'b0;
      b_last <= 1'b0;
      b_oaddr <= {AW{1'b0}};
      b_d <= {DW{1'b0}};
      out_we <= 1'b0;
      out_last <= 1'b0;
      out_addr <= {AW{1'b0}};
      out_data <= {OW{1'b0}};
    end else begin
      b_valid <= a_done;
      if (a_done) begin
        b_last <= a_last;
        b_oaddr <= a_oaddr;
        b_d <= d_next;
      end
      if (load) begin
        acc_r <= acc_in;
        a_busy <= 1'b1;
        a_last <= load_last;
        a_o <= o_in;
        a_oaddr <= oaddr_in;
        k <= 4'd0;
        d_sum <= {DW{1'b0}};
      end else if (a_busy) begin
        d_sum <= d_next;
        k <= k + 4'd1;
        if (a_done) a_busy <= 1'b0;
      end
      out_we <= b_valid;
      out_last <= b_valid && b_last;
      if (b_valid) begin
        out_addr <= b_oaddr;
        out_data <= sat[OW-1:0];
      end
    end
  end
endmodule
`default_nettype wire
