`timescale 1ns/1ps
`default_nettype none
// Area-only 8-input PE for yosys, INT4 HLUQ/CAG: the accelerator's own pe_array (8 dispatch + hybrid lanes,
// 4-bit codes, 5-bit signed weights, F = 6 which is exact for 4-bit HLUQ) with registered operands and its
// two accumulators (multiply path, shift path). Same structure as pe8_int8 and pe8_fp32.
module pe8_hybrid4 #(
    parameter integer SW = 24
) (
    input  wire                 clk,
    input  wire                 clear,
    input  wire                 hluq,
    input  wire [4:0]           n_log,
    input  wire [3:0]           zero,
    input  wire [31:0]          codes_in,
    input  wire [39:0]          weights_in,
    output reg  signed [SW-1:0] acc_mul,
    output reg  signed [SW-1:0] acc_log
);
  reg  [31:0] codes;
  reg  [39:0] weights;
  wire signed [SW-1:0] mul_sum, log_sum;
  pe_array #(.LANES(8), .XB(4), .WB(5), .F(6), .SW(SW)) u_array (
      .codes(codes), .weights(weights), .hluq(hluq), .n_log(n_log), .zero(zero),
      .mul_sum(mul_sum), .log_sum(log_sum));
  always @(posedge clk) begin
    codes <= codes_in;
    weights <= weights_in;
    if (clear) begin
      acc_mul <= {SW{1'b0}};
      acc_log <= {SW{1'b0}};
    end else begin
      acc_mul <= acc_mul + mul_sum;
      acc_log <= acc_log + log_sum;
    end
  end
endmodule
`default_nettype wire
