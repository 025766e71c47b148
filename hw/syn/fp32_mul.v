`timescale 1ns/1ps
`default_nettype none
// FP32 multiply for the area-only baseline lane: truncating, denormals flushed to zero.
module fp32_mul (
    input  wire [31:0] a,
    input  wire [31:0] b,
    output wire [31:0] y
);
  wire        zero = (a[30:23] == 8'd0) || (b[30:23] == 8'd0);
  // truncating rounding: the low product bits are dropped
  /* verilator lint_off UNUSEDSIGNAL */
  wire [47:0] p    = {1'b1, a[22:0]} * {1'b1, b[22:0]};
  /* verilator lint_on UNUSEDSIGNAL */
  wire [9:0]  e    = {2'b00, a[30:23]} + {2'b00, b[30:23]} - 10'd127 + {9'd0, p[47]};
  wire [22:0] m    = p[47] ? p[46:24] : p[45:23];
  wire        uflow = e[9] || (e[8:0] == 9'd0);
  wire        oflow = !e[9] && e[8];
  assign y = (zero || uflow) ? {a[31] ^ b[31], 31'd0}
           : (oflow ? {a[31] ^ b[31], 8'hfe, 23'h7fffff} : {a[31] ^ b[31], e[7:0], m});
endmodule
`default_nettype wire
