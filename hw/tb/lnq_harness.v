`timescale 1ns/1ps
`default_nettype none
// Simulation-only harness for lnq_lut: on `start` it reads SFILE (table size, code count), TFILE (table)
// and KFILE (codes), writes the table through the write port, streams the codes through the read port
// one per cycle and dumps the values to OFILE before raising `done`.
module lnq_harness #(
    parameter integer XB = 8,
    parameter integer DEPTH = 65536
) (
    input  wire clk,
    input  wire rst,
    input  wire start,
    output reg  done
);
  localparam integer VB = 16;
  reg [31:0]      sizes [0:1];
  reg [VB-1:0]    table_mem [0:(1<<XB)-1];
  reg [XB-1:0]    codes [0:DEPTH-1];
  reg [VB-1:0]    values [0:DEPTH-1];
  reg [8*512-1:0] sfile, tfile, kfile, ofile;
  initial begin
    if (!$value$plusargs("SFILE=%s", sfile) || !$value$plusargs("TFILE=%s", tfile) ||
        !$value$plusargs("KFILE=%s", kfile) || !$value$plusargs("OFILE=%s", ofile))
      $fatal(1, "lnq_harness: plusargs SFILE TFILE KFILE OFILE are required");
  end

  localparam [1:0] IDLE = 2'd0, FETCH = 2'd1, WRITE = 2'd2, READ = 2'd3;
  reg  [1:0]  state;
  reg  [31:0] idx;
  reg         rvalid;
  reg  [15:0] ridx;
  wire [31:0] n_table = sizes[0];
  wire [31:0] n_codes = sizes[1];
  wire [VB-1:0] rdata;
  wire        we = (state == WRITE);
  wire        re = (state == READ) && (idx < n_codes);
  lnq_lut #(.XB(XB), .VB(VB)) u_lut (
      .clk(clk), .we(we), .waddr(idx[XB-1:0]), .wdata(table_mem[idx[XB-1:0]]),
      .re(re), .raddr(codes[idx[15:0]]), .rdata(rdata));

  always @(posedge clk) begin
    if (rst) begin
      state <= IDLE;
      idx <= 32'd0;
      rvalid <= 1'b0;
      ridx <= 16'd0;
      done <= 1'b0;
    end else begin
      rvalid <= re;
      ridx <= idx[15:0];
      if (rvalid) values[ridx] <= rdata;
      case (state)
        IDLE: if (start) begin
          $readmemh(sfile, sizes);
          done <= 1'b0;
          state <= FETCH;
        end
        FETCH: begin
          if (n_table > (1 << XB) || n_codes > DEPTH || n_codes == 0)
            $fatal(1, "lnq_harness: table %0d / codes %0d exceed the harness", n_table, n_codes);
          $readmemh(tfile, table_mem, 0, n_table - 1);
          $readmemh(kfile, codes, 0, n_codes - 1);
          idx <= 32'd0;
          state <= WRITE;
        end
        WRITE: begin
          idx <= idx + 32'd1;
          if (idx == n_table - 1) begin
            idx <= 32'd0;
            state <= READ;
          end
        end
        default: begin
          if (idx < n_codes) idx <= idx + 32'd1;
          if (!rvalid && !re) begin
            $writememh(ofile, values, 0, n_codes - 1);
            done <= 1'b1;
            state <= IDLE;
          end
        end
      endcase
    end
  end
endmodule
`default_nettype wire
