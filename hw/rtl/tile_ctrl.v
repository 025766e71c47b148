`timescale 1ns/1ps
`default_nettype none
// Tile sequencer: loops token -> output channel -> beat and issues one beat address per cycle. The last
// beat of a dot product is held back until the shared requantizer (one slot per cycle) can take it; those
// cycles are counted as stalls.
module tile_ctrl #(
    parameter integer AW = 20  // memory address bits
) (
    input  wire          clk,
    input  wire          rst,
    input  wire          start,
    input  wire [15:0]   n_tok,
    input  wire [15:0]   n_out,
    input  wire [15:0]   n_beats,
    input  wire [3:0]    n_slots,
    output wire          issue,      // a beat is read this cycle
    output wire          stall,      // a beat is ready but the requantizer is busy
    output wire          last_beat,  // the issued beat ends a dot product
    output wire          last_item,  // ... and it is the tile's final dot product
    output wire [AW-1:0] x_addr,
    output wire [AW-1:0] w_addr,
    output wire [15:0]   g_addr,
    output wire [15:0]   o_idx,
    output reg  [AW-1:0] out_addr
);
`ifndef SYNTHESIS
  initial if (AW < 8 || AW > 32) $fatal(1, "tile_ctrl: AW=%0d outside 8..32", AW);
`endif
  reg          running;
  reg [15:0]   beat, out_ch, tok;
  reg [AW-1:0] x_base, w_base;
  reg [3:0]    credit;
  assign last_beat = (beat == n_beats - 16'd1);
  assign last_item = last_beat && (out_ch == n_out - 16'd1) && (tok == n_tok - 16'd1);
  assign issue     = running && (!last_beat || credit == 4'd0);
  assign stall     = running && !issue;
  assign x_addr    = x_base + {{(AW - 16){1'b0}}, beat};
  assign w_addr    = w_base + {{(AW - 16){1'b0}}, beat};
  assign g_addr    = beat;
  assign o_idx     = out_ch;
  wire [AW-1:0] nb = {{(AW - 16){1'b0}}, n_beats};
  always @(posedge clk) begin
    if (rst) begin
      running <= 1'b0;
      beat <= 16'd0;
      out_ch <= 16'd0;
      tok <= 16'd0;
      x_base <= {AW{1'b0}};
      w_base <= {AW{1'b0}};
      out_addr <= {AW{1'b0}};
      credit <= 4'd0;
    end else if (start && !running) begin
      running <= 1'b1;
      beat <= 16'd0;
      out_ch <= 16'd0;
      tok <= 16'd0;
      x_base <= {AW{1'b0}};
      w_base <= {AW{1'b0}};
      out_addr <= {AW{1'b0}};
      credit <= 4'd0;
    end else begin
      if (credit != 4'd0) credit <= credit - 4'd1;
      if (issue && !last_beat) beat <= beat + 16'd1;
      if (issue && last_beat) begin
        beat <= 16'd0;
        credit <= n_slots - 4'd1;
        out_addr <= out_addr + 1'b1;
        if (out_ch == n_out - 16'd1) begin
          out_ch <= 16'd0;
          w_base <= {AW{1'b0}};
          tok <= tok + 16'd1;
          x_base <= x_base + nb;
          if (last_item) running <= 1'b0;
        end else begin
          out_ch <= out_ch + 16'd1;
          w_base <= w_base + nb;
        end
      end
    end
  end
endmodule
`default_nettype wire
