/*
 * fuzz_agent_host: the guest agent channel as the host reads it (runtime/vm/channel.c,
 * cl_chan_input): frames from an untrusted guest, in reads of 1..64 bytes (the first input byte
 * seeds the sizes), against requests in flight of every kind — ids 1 exec (64-byte output caps,
 * 100 stdin bytes sent), 2 exec streaming, 3 write_file of 10 bytes, 4 read_file capped at 128
 * bytes, 5 ping, 6 shutdown — and a restore probe (id 7). fuzz_agent_frame covers the frame
 * codec itself; this is the host's state machine on top of it. Oracle: the caps hold (collected
 * output, file data, announced size, stdin acknowledgements), exit codes and signals are in
 * range, a finished exec had started, a closed channel says why and every request in flight
 * failed with it, agent strings are printable, and the buffer never holds a complete frame.
 */
#include "fuzz_vm.h"
#include "vm/chan.h"

enum { NREQ = 6 };
static const int kinds[NREQ] = {R_EXEC, R_EXEC, R_WRITE, R_READ, R_PING, R_SHUTDOWN};

static void printable(const char *s, const char *what) {
  for (; *s; s++)
    if (*s < 32 || *s > 126) fz_abort("agent_host: unprintable agent text in", what);
}

static void check_req(vm *v, vm_req *r) {
  if (r->out.len > r->max_out || r->err.len > r->max_err)
    fz_abort("agent_host", "output over its cap");
  if (r->out_total < r->out.len || r->err_total < r->err.len)
    fz_abort("agent_host", "output totals too small");
  if (r->exit_code < 0 || r->exit_code > 255) fz_abort("agent_host", "exit code out of range");
  if (r->exit_signal < 0 || r->exit_signal > 64) fz_abort("agent_host", "exit signal out of range");
  if (r->in_acked > r->in_sent) fz_abort("agent_host", "stdin acknowledged beyond what was sent");
  if (r->data.len > r->rmax || (r->rinfo && r->rsize > r->rmax))
    fz_abort("agent_host", "read over its cap");
  if (r->kind == R_EXEC && r->done && !r->started)
    fz_abort("agent_host", "exec done before it started");
  size_t q = 0;
  for (chunk *c = r->qhead; c; c = c->next) q += c->len;
  if (q != r->queued) fz_abort("agent_host", "queued bytes miscounted");
  if (!memchr(r->error, 0, sizeof r->error)) fz_abort("agent_host", "request error not terminated");
  if (v->chan.closed && !r->done && !r->failed)
    fz_abort("agent_host", "a request outlived the channel");
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  vm *v = fz_vm();
  v->chan.in = malloc(IN_CAP);
  if (!v->chan.in) fz_abort("malloc", "out of memory");
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  vm *v = fz_vm();
  vm_chan *c = &v->chan;
  fz_cuts cuts = fz_cuts_of(&data, &size);
  c->closed = 0;
  c->ready = 0;
  c->error[0] = c->uname[0] = 0;
  c->in_len = 0;
  c->next_id = 0;
  c->throttled = 0;
  if (c->reqs) fz_abort("agent_host", "requests of the last input are still linked");
  vm_req *reqs[NREQ];
  for (int i = 0; i < NREQ; i++) {
    /* as cl_chan_new_req links one, without its Lua userdata: an input then allocates only what
     * the channel does, and frees it, so libFuzzer's per-input leak check stays cheap */
    vm_req *r = calloc(1, sizeof *r);
    if (!r) fz_abort("calloc", "out of memory");
    r->kind = kinds[i];
    r->v = v;
    r->id = ++c->next_id;
    r->next = c->reqs;
    c->reqs = r;
    r->max_out = r->max_err = 64;
    r->in_sent = 100;
    r->streaming = i == 1;
    r->wlen = 10;
    r->rmax = 128;
    reqs[i] = r;
  }
  c->probe_id = ++c->next_id;
  size_t off = 0;
  while (off < size && !c->closed) {
    size_t room = IN_CAP - c->in_len;
    size_t n = fz_cut(&cuts, size - off);
    if (n > room) n = room;
    if (n == 0) fz_abort("agent_host", "the input buffer is full");
    memcpy(c->in + c->in_len, data + off, n);
    cl_chan_input(v, n);
    off += n;
    if (c->throttled) break; /* the host stops reading until a consumer catches up */
  }
  if (c->closed) {
    if (!c->error[0]) fz_abort("agent_host", "the channel closed without a reason");
    printable(c->error, "the channel error");
  } else if (c->in_len >= CLA_HEADER) {
    cla_header h;
    if (!cla_header_get(c->in, &h)) fz_abort("agent_host", "a bad header was left in the buffer");
    if (c->in_len >= CLA_HEADER + h.len) fz_abort("agent_host", "a complete frame was left unread");
  }
  printable(c->uname, "uname");
  for (int i = 0; i < NREQ; i++) check_req(v, reqs[i]);
  cl_chan_close(v, "end of input");
  for (int i = 0; i < NREQ; i++) {
    cl_chan_req_release(reqs[i]);
    free(reqs[i]);
  }
  return fz_done(v->L);
}
