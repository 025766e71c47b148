`timescale 1ns/1ps
`default_nettype none
// Layer and group-parameter registers, written one 32-bit word per cycle before start. The per-group
// (CAG) or per-region (HLUQ) slot scales live here as 16-bit mantissa + right shift, next to the group
// zero points, so a layer needs only NS of each on chip; per-output-channel constants stay in memory.
// Address map: 0 mode, 1 n_log, 2 n_slots, 3 n_tok, 4 n_out, 5 n_beats, 6 qmin, 7 qmax,
// 8+k zero point k, 16+k slot mantissa k, 24+k slot shift k.
module param_regs #(
    parameter integer NS = 8,   // accumulator slots (max CAG groups)
    parameter integer XB = 8,
    parameter integer MB = 16,  // slot mantissa bits
    parameter integer EB = 6    // slot shift bits
) (
    input  wire               clk,
    input  wire               rst,
    input  wire               we,
    input  wire [4:0]         addr,
    input  wire [31:0]        data,
    output reg                hluq,
    output reg  [XB:0]        n_log,
    output reg  [3:0]         n_slots,
    output reg  [15:0]        n_tok,
    output reg  [15:0]        n_out,
    output reg  [15:0]        n_beats,
    output reg  signed [31:0] qmin,
    output reg  signed [31:0] qmax,
    output wire [NS*XB-1:0]   slot_zero,
    output wire [NS*MB-1:0]   slot_mant,
    output wire [NS*EB-1:0]   slot_shift
);
`ifndef SYNTHESIS
  initial if (NS < 1 || NS > 8 || MB > 32 || EB > 32) $fatal(1, "param_regs: NS=%0d MB=%0d EB=%0d", NS, MB, EB);
`endif
  reg [XB-1:0] zp   [0:NS-1];
  reg [MB-1:0] mant [0:NS-1];
  reg [EB-1:0] shft [0:NS-1];
  genvar g;
  generate
    for (g = 0; g < NS; g = g + 1) begin : g_slot
      assign slot_zero[g*XB +: XB]  = zp[g];
      assign slot_mant[g*MB +: MB]  = mant[g];
      assign slot_shift[g*EB +: EB] = shft[g];
    end
  endgenerate
  integer k;
  always @(posedge clk) begin
    if (rst) begin
      hluq <= 1'b0;
      n_log <= {(XB + 1){1'b0}};
      n_slots <= 4'd1;
      n_tok <= 16'd0;
      n_out <= 16'd0;
      n_beats <= 16'd0;
      qmin <= 32'sd0;
      qmax <= 32'sd0;
      for (k = 0; k < NS; k = k + 1) begin
        zp[k] <= {XB{1'b0}};
        mant[k] <= {MB{1'b0}};
        shft[k] <= {EB{1'b0}};
      end
    end else if (we) begin
      case (addr)
        5'd0: hluq <= data[0];
        5'd1: n_log <= data[XB:0];
        5'd2: n_slots <= data[3:0];
        5'd3: n_tok <= data[15:0];
        5'd4: n_out <= data[15:0];
        5'd5: n_beats <= data[15:0];
        5'd6: qmin <= data;
        5'd7: qmax <= data;
        default: begin
          if (addr[4:3] == 2'b01 && {29'd0, addr[2:0]} < NS) zp[addr[2:0]] <= data[XB-1:0];
          if (addr[4:3] == 2'b10 && {29'd0, addr[2:0]} < NS) mant[addr[2:0]] <= data[MB-1:0];
          if (addr[4:3] == 2'b11 && {29'd0, addr[2:0]} < NS) shft[addr[2:0]] <= data[EB-1:0];
        end
      endcase
    end
  end
endmodule
`default_nettype wire
