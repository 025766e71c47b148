`timescale 1ns/1ps
`default_nettype none
// FP32 add for the area-only baseline lane: align, add/subtract, normalise with a leading-zero count;
// truncating, denormals flushed to zero.
module fp32_add (
    input  wire [31:0] a,
    input  wire [31:0] b,
    output reg  [31:0] y
);
  wire        swap = b[30:0] > a[30:0];
  wire [31:0] big  = swap ? b : a;
  wire [31:0] sml  = swap ? a : b;
  wire [7:0]  diff = big[30:23] - sml[30:23];
  wire [24:0] mb   = (big[30:23] == 8'd0) ? 25'd0 : {2'b01, big[22:0]};
  wire [24:0] ms   = (sml[30:23] == 8'd0) ? 25'd0 : ({2'b01, sml[22:0]} >> diff);
  wire [24:0] s    = (big[31] == sml[31]) ? mb + ms : mb - ms;
  integer i;
  reg [4:0]  lz;
  reg        found;
  // norm[24] is the hidden one and norm[0] is truncated
  /* verilator lint_off UNUSEDSIGNAL */
  reg [24:0] norm;
  /* verilator lint_on UNUSEDSIGNAL */
  reg [8:0]  e;
  always @* begin
    lz = 5'd0;
    found = 1'b0;
    for (i = 24; i >= 0; i = i - 1) begin
      if (!found && s[i]) begin
        lz = 5'd24 - i[4:0];
        found = 1'b1;
      end
    end
    norm = s << lz;
    e = {1'b0, big[30:23]} + 9'd1 - {4'd0, lz};
    if (!found || e[8] || e[7:0] == 8'd0) y = 32'd0;
    else y = {big[31], e[7:0], norm[23:1]};
  end
endmodule
`default_nettype wire
