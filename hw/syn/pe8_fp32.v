`timescale 1ns/1ps
`default_nettype none
// Area-only 8-input PE for yosys, FP32 baseline: 8 FP32 multipliers, a 7-adder FP32 tree and an FP32
// accumulating adder, with registered operands (same structure as pe8_hybrid4 and pe8_int8).
module pe8_fp32 (
    input  wire         clk,
    input  wire         clear,
    input  wire [255:0] a_in,
    input  wire [255:0] w_in,
    output reg  [31:0]  acc
);
  reg  [255:0] a, w;
  wire [31:0]  prod [0:7];
  wire [31:0]  l1 [0:3];
  wire [31:0]  l2 [0:1];
  wire [31:0]  total, next;
  genvar i;
  generate
    for (i = 0; i < 8; i = i + 1) begin : g_mul
      fp32_mul u_mul (.a(a[i*32 +: 32]), .b(w[i*32 +: 32]), .y(prod[i]));
    end
    for (i = 0; i < 4; i = i + 1) begin : g_l1
      fp32_add u_add (.a(prod[2*i]), .b(prod[2*i+1]), .y(l1[i]));
    end
    for (i = 0; i < 2; i = i + 1) begin : g_l2
      fp32_add u_add (.a(l1[2*i]), .b(l1[2*i+1]), .y(l2[i]));
    end
  endgenerate
  fp32_add u_top (.a(l2[0]), .b(l2[1]), .y(total));
  fp32_add u_acc (.a(acc), .b(total), .y(next));
  always @(posedge clk) begin
    a <= a_in;
    w <= w_in;
    acc <= clear ? 32'd0 : next;
  end
endmodule
`default_nettype wire
