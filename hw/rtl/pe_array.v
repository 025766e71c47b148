`timescale 1ns/1ps
`default_nettype none
// LANES dispatch+PE lanes working on one beat (LANES channel pairs of one token and one output channel)
// and two adder trees: multiply-path sum and shift-path sum (which carries the HLUQ s1 offsets).
module pe_array #(
    parameter integer LANES = 8,
    parameter integer XB    = 8,
    parameter integer WB    = 9,
    parameter integer F     = 16,
    parameter integer SW    = 48   // width of the tree sums (accumulator width)
) (
    input  wire [LANES*XB-1:0]  codes,
    input  wire [LANES*WB-1:0]  weights,
    input  wire                 hluq,
    input  wire [XB:0]          n_log,
    input  wire [XB-1:0]        zero,
    output reg  signed [SW-1:0] mul_sum,
    output reg  signed [SW-1:0] log_sum
);
`ifndef SYNTHESIS
  initial if (LANES < 1 || SW < XB + WB + F + 2 + $clog2(LANES)) $fatal(1, "pe_array: LANES=%0d SW=%0d invalid", LANES, SW);
`endif
  wire signed [XB+WB:0]  prod    [0:LANES-1];
  wire signed [WB+F-1:0] shifted [0:LANES-1];
  genvar i;
  generate
    for (i = 0; i < LANES; i = i + 1) begin : g_lane
      wire          to_shift, is_zero;
      wire [XB:0]   mul_op, shift_k;
      lane_dispatch #(.XB(XB)) u_dispatch (
          .code(codes[i*XB +: XB]), .hluq(hluq), .n_log(n_log), .zero(zero),
          .to_shift(to_shift), .is_zero(is_zero), .mul_op(mul_op), .shift_k(shift_k));
      pe_lane #(.XB(XB), .WB(WB), .F(F)) u_lane (
          .to_shift(to_shift), .is_zero(is_zero), .mul_op(mul_op), .shift_k(shift_k),
          .w(weights[i*WB +: WB]), .prod(prod[i]), .shifted(shifted[i]));
    end
  endgenerate
  // each tree is only as wide as its sum can get; the results are sign-extended to SW
  localparam integer LB = (LANES > 1) ? $clog2(LANES) : 1;
  localparam integer TM = XB + WB + 1 + LB;
  localparam integer TL = WB + F + LB;
  reg signed [TM-1:0] tm;
  reg signed [TL-1:0] tl;
  integer l;
  always @* begin
    tm = {TM{1'b0}};
    tl = {TL{1'b0}};
    for (l = 0; l < LANES; l = l + 1) begin
      tm = tm + {{LB{prod[l][XB+WB]}}, prod[l]};
      tl = tl + {{LB{shifted[l][WB+F-1]}}, shifted[l]};
    end
    mul_sum  = {{(SW - TM){tm[TM-1]}}, tm};
    log_sum  = {{(SW - TL){tl[TL-1]}}, tl};
  end
endmodule
`default_nettype wire
