`timescale 1ns/1ps
`default_nettype none
// Simulation-only harness around ahcq_tile: on `load` it reads the register image and the beat, group and
// per-output memories from the hex files named by plusargs (CFILE, XFILE, WFILE, GFILE, PFILE), writes the
// registers through the configuration port and raises `ready`; after `done` it dumps the outputs to OFILE.
module tile_harness #(
    parameter integer LANES = 8,
    parameter integer AW    = 17
) (
    input  wire        clk,
    input  wire        rst,
    input  wire        load,
    input  wire        start,
    output reg         ready,
    output wire        busy,
    output wire        done,
    output wire [31:0] cycles,
    output wire [31:0] stalls
);
  localparam integer XB = 8;
  localparam integer WB = 9;
  localparam integer DEPTH = 1 << AW;
  initial if (AW < 16 || AW > 20 || LANES < 1) $fatal(1, "tile_harness: AW=%0d LANES=%0d", AW, LANES);

  reg [LANES*XB-1:0] xmem [0:DEPTH-1];
  reg [LANES*WB-1:0] wmem [0:DEPTH-1];
  reg [2:0]          gmem [0:65535];
  reg [151:0]        pmem [0:65535];
  reg [31:0]         omem [0:DEPTH-1];
  reg [31:0]         cmem [0:31];
  reg [8*512-1:0]    cfile, xfile, wfile, gfile, pfile, ofile;

  initial begin
    if (!$value$plusargs("CFILE=%s", cfile) || !$value$plusargs("XFILE=%s", xfile) ||
        !$value$plusargs("WFILE=%s", wfile) || !$value$plusargs("GFILE=%s", gfile) ||
        !$value$plusargs("PFILE=%s", pfile) || !$value$plusargs("OFILE=%s", ofile))
      $fatal(1, "tile_harness: plusargs CFILE XFILE WFILE GFILE PFILE OFILE are required");
  end

  wire [15:0] n_tok = cmem[3][15:0];
  wire [15:0] n_out = cmem[4][15:0];
  wire [15:0] n_beats = cmem[5][15:0];
  wire [31:0] x_words = n_tok * n_beats;
  wire [31:0] w_words = n_out * n_beats;
  wire [31:0] o_words = n_tok * n_out;
  reg   [5:0] cfg_idx;
  reg         fetch, loading;
  always @(posedge clk) begin
    if (rst) begin
      ready <= 1'b0;
      fetch <= 1'b0;
      loading <= 1'b0;
      cfg_idx <= 6'd0;
    end else if (load) begin
      $readmemh(cfile, cmem);
      ready <= 1'b0;
      fetch <= 1'b1;
    end else if (fetch) begin
      if (x_words > DEPTH || w_words > DEPTH || o_words > DEPTH)
        $fatal(1, "tile_harness: tile %0dx%0dx%0d beats exceeds DEPTH=%0d", n_tok, n_out, n_beats, DEPTH);
      $readmemh(xfile, xmem, 0, x_words - 1);
      $readmemh(wfile, wmem, 0, w_words - 1);
      $readmemh(gfile, gmem, 0, n_beats - 1);
      $readmemh(pfile, pmem, 0, n_out - 1);
      fetch <= 1'b0;
      loading <= 1'b1;
      cfg_idx <= 6'd0;
    end else if (loading) begin
      cfg_idx <= cfg_idx + 6'd1;
      if (cfg_idx == 6'd31) begin
        loading <= 1'b0;
        ready <= 1'b1;
      end
    end
  end

  wire [AW-1:0]       x_addr, w_addr, out_addr;
  wire [15:0]         g_addr, p_addr;
  reg  [LANES*XB-1:0] x_q;
  reg  [LANES*WB-1:0] w_q;
  reg  [2:0]          g_q;
  reg  [151:0]        p_q;
  wire                out_we;
  wire [31:0]         out_data;
  always @(posedge clk) begin
    x_q <= xmem[x_addr];
    w_q <= wmem[w_addr];
    g_q <= gmem[g_addr];
    p_q <= pmem[p_addr];
    if (out_we) omem[out_addr] <= out_data;
  end

  ahcq_tile #(.LANES(LANES), .XB(XB), .WB(WB), .AW(AW)) u_dut (
      .clk(clk), .rst(rst), .cfg_we(loading), .cfg_addr(cfg_idx[4:0]), .cfg_data(cmem[cfg_idx[4:0]]),
      .start(start && ready), .busy(busy), .done(done), .cycles(cycles), .stalls(stalls),
      .x_addr(x_addr), .x_data(x_q), .w_addr(w_addr), .w_data(w_q), .g_addr(g_addr), .g_data(g_q),
      .p_addr(p_addr), .p_data(p_q), .out_we(out_we), .out_addr(out_addr), .out_data(out_data));

  reg done_d;
  always @(posedge clk) begin
    done_d <= done;
    if (done && !done_d) $writememh(ofile, omem, 0, o_words - 1);
  end
endmodule
`default_nettype wire
