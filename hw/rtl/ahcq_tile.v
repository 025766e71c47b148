`timescale 1ns/1ps
`default_nettype none
// Top level: streams one Linear tile (tokens x Cin x Cout) from beat memories through the PE array into
// per-slot accumulators (CAG groups, or the HLUQ multiply and shift paths), hands each finished dot product to
// the requantizer and writes output codes. Memories are outside (synchronous read, one cycle latency).
// start -> done is counted in `cycles`; cycles where the requantizer holds the array back in `stalls`.
module ahcq_tile #(
    parameter integer LANES = 8,
    parameter integer XB    = 8,
    parameter integer WB    = 9,
    parameter integer F     = 16,
    parameter integer NS    = 8,
    parameter integer SW    = 48,
    parameter integer AW    = 20
) (
    input  wire                clk,
    input  wire                rst,
    input  wire                cfg_we,
    input  wire [4:0]          cfg_addr,
    input  wire [31:0]         cfg_data,
    input  wire                start,
    output reg                 busy,
    output reg                 done,
    output reg  [31:0]         cycles,
    output reg  [31:0]         stalls,
    output wire [AW-1:0]       x_addr,
    input  wire [LANES*XB-1:0] x_data,
    output wire [AW-1:0]       w_addr,
    input  wire [LANES*WB-1:0] w_data,
    output wire [15:0]         g_addr,
    input  wire [2:0]          g_data,
    output wire [15:0]         p_addr,
    input  wire [151:0]        p_data,
    output wire                out_we,
    output wire [AW-1:0]       out_addr,
    output wire [31:0]         out_data
);
`ifndef SYNTHESIS
  initial if (LANES < 1 || NS < 2 || NS > 8) $fatal(1, "ahcq_tile: LANES=%0d NS=%0d (need NS in 2..8)", LANES, NS);
`endif
  localparam integer MB = 16;
  localparam integer EB = 6;

  wire          hluq;
  wire [XB:0]   n_log;
  wire [3:0]    n_slots;
  wire [15:0]   n_tok, n_out, n_beats;
  wire signed [31:0] qmin, qmax;
  wire [NS*XB-1:0] slot_zero;
  wire [NS*MB-1:0] slot_mant;
  wire [NS*EB-1:0] slot_shift;
  param_regs #(.NS(NS), .XB(XB), .MB(MB), .EB(EB)) u_regs (
      .clk(clk), .rst(rst), .we(cfg_we), .addr(cfg_addr), .data(cfg_data),
      .hluq(hluq), .n_log(n_log), .n_slots(n_slots), .n_tok(n_tok), .n_out(n_out), .n_beats(n_beats),
      .qmin(qmin), .qmax(qmax), .slot_zero(slot_zero), .slot_mant(slot_mant), .slot_shift(slot_shift));

  wire go = start && !busy;
  wire issue, stall, last_beat, last_item;
  wire [15:0]   o_idx;
  wire [AW-1:0] iss_oaddr;
  tile_ctrl #(.AW(AW)) u_ctrl (
      .clk(clk), .rst(rst), .start(go), .n_tok(n_tok), .n_out(n_out), .n_beats(n_beats), .n_slots(n_slots),
      .issue(issue), .stall(stall), .last_beat(last_beat), .last_item(last_item),
      .x_addr(x_addr), .w_addr(w_addr), .g_addr(g_addr), .o_idx(o_idx), .out_addr(iss_oaddr));

  // beat data arrives one cycle after issue: delay the tags to match
  reg           v1, last1, final1;
  reg [15:0]    o1;
  reg [AW-1:0]  oaddr1;
  always @(posedge clk) begin
    if (rst) begin
      v1 <= 1'b0;
      last1 <= 1'b0;
      final1 <= 1'b0;
      o1 <= 16'd0;
      oaddr1 <= {AW{1'b0}};
    end else begin
      v1 <= issue;
      last1 <= last_beat;
      final1 <= last_item;
      o1 <= o_idx;
      oaddr1 <= iss_oaddr;
    end
  end

  // the beat's group selects its zero point (HLUQ has none: its offsets are in the shift path)
  wire [XB-1:0] beat_zero = hluq ? {XB{1'b0}} : slot_zero[g_data*XB +: XB];
  wire signed [SW-1:0] mul_sum, log_sum;
  pe_array #(.LANES(LANES), .XB(XB), .WB(WB), .F(F), .SW(SW)) u_array (
      .codes(x_data), .weights(w_data), .hluq(hluq), .n_log(n_log), .zero(beat_zero),
      .mul_sum(mul_sum), .log_sum(log_sum));

  // slot routing: HLUQ uses slot 0 (multiply path) and 1 (shift path); uniform/CAG the beat's group
  reg  [NS*SW-1:0] acc, acc_next;
  integer s;
  always @* begin
    for (s = 0; s < NS; s = s + 1) begin
      if (hluq)
        acc_next[s*SW +: SW] = acc[s*SW +: SW] + (s == 0 ? mul_sum : (s == 1 ? log_sum : {SW{1'b0}}));
      else
        acc_next[s*SW +: SW] = acc[s*SW +: SW] + ((g_data == s[2:0]) ? mul_sum : {SW{1'b0}});
    end
  end
  always @(posedge clk) begin
    if (rst || go) acc <= {(NS * SW){1'b0}};
    else if (v1) acc <= last1 ? {(NS * SW){1'b0}} : acc_next;
  end

  wire out_last;
  requant #(.NS(NS), .SW(SW), .MB(MB), .EB(EB), .AW(AW)) u_requant (
      .clk(clk), .rst(rst), .load(v1 && last1), .load_last(final1), .acc_in(acc_next), .o_in(o1),
      .oaddr_in(oaddr1), .n_slots(n_slots), .slot_mant(slot_mant), .slot_shift(slot_shift),
      .p_addr(p_addr), .p_data(p_data), .qmin(qmin), .qmax(qmax),
      .out_we(out_we), .out_last(out_last), .out_addr(out_addr), .out_data(out_data));

  always @(posedge clk) begin
    if (rst) begin
      busy <= 1'b0;
      done <= 1'b0;
      cycles <= 32'd0;
      stalls <= 32'd0;
    end else if (go) begin
      busy <= 1'b1;
      done <= 1'b0;
      cycles <= 32'd0;
      stalls <= 32'd0;
    end else if (busy) begin
      cycles <= cycles + 32'd1;
      if (stall) stalls <= stalls + 32'd1;
      if (out_we && out_last) begin
        busy <= 1'b0;
        done <= 1'b1;
      end
    end
  end
endmodule
`default_nettype wire
