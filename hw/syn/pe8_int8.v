`timescale 1ns/1ps
`default_nettype none
// Area-only 8-input PE for yosys, INT8 baseline: 8 signed 8x8 multipliers, an adder tree and one 32-bit
// accumulator (tree 19 bits wide), with registered operands (same structure as pe8_hybrid4 and pe8_fp32).
module pe8_int8 #(
    parameter integer AB = 32
) (
    input  wire                 clk,
    input  wire                 clear,
    input  wire [63:0]          a_in,
    input  wire [63:0]          w_in,
    output reg  signed [AB-1:0] acc
);
  reg [63:0] a, w;
  reg signed [18:0] sum;
  reg signed [15:0] prod;
  integer i;
  always @* begin
    sum = 19'sd0;
    for (i = 0; i < 8; i = i + 1) begin
      prod = $signed(a[i*8 +: 8]) * $signed(w[i*8 +: 8]);
      sum = sum + {{3{prod[15]}}, prod};
    end
  end
  always @(posedge clk) begin
    a <= a_in;
    w <= w_in;
    acc <= clear ? {AB{1'b0}} : acc + {{(AB - 19){sum[18]}}, sum};
  end
endmodule
`default_nettype wire
