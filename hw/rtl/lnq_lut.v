`timescale 1ns/1ps
`default_nettype none
// LNQ decode ROM for attention probabilities: 2^XB entries of unsigned Q1.15, written once per layer
// through the write port (the table depends on the layer's clip and alpha), read with one cycle latency.
module lnq_lut #(
    parameter integer XB = 8,   // code bits
    parameter integer VB = 16   // value bits
) (
    input  wire          clk,
    input  wire          we,
    input  wire [XB-1:0] waddr,
    input  wire [VB-1:0] wdata,
    input  wire          re,
    input  wire [XB-1:0] raddr,
    output reg  [VB-1:0] rdata
);
`ifndef SYNTHESIS
  initial if (XB < 1 || XB > 12 || VB < 1) $fatal(1, "lnq_lut: XB=%0d VB=%0d out of range", XB, VB);
`endif
  reg [VB-1:0] rom [0:(1<<XB)-1];
  always @(posedge clk) begin
    if (we) rom[waddr] <= wdata;
    if (re) rdata <= rom[raddr];
  end
endmodule
`default_nettype wire
