/*
 * The parsers of what a VMM or a guest sends the host, as entry points of their own: each is
 * the body of an fd callback (on_qmp, libcurl's write callback, on_chan) minus the read, so that
 * tests/fuzz can feed them bytes without a VMM. Internal to runtime/vm/ and the fuzz harnesses;
 * nothing here is reachable from Lua.
 */
#ifndef CLAWLUA_VM_INPUT_H
#define CLAWLUA_VM_INPUT_H

#include "vm.h"

#include <stddef.h>

/* QMP (qemu.c). v->qin holds QMP_IN_CAP bytes; a message longer than that is dropped. */
#define QMP_IN_CAP ((size_t)1 << 20)
/* n bytes were appended at v->qin + v->qin_len (at most QMP_IN_CAP - 1 - v->qin_len): handles
 * every complete line and keeps the rest. */
void cl_qmp_input(vm *v, size_t n);

/* Firecracker's API answers (firecracker.c). */
#define API_BODY_MAX ((size_t)1 << 20)
/* libcurl's write callback: appends to the answer's body (ud: the vm_api); 0 past the cap. */
size_t cl_fc_on_body(char *data, size_t size, size_t nmemb, void *ud);
/* Reads firecracker_version from the GET / answer in v->api.body: 1 with fc_major/fc_minor set. */
int cl_fc_parse_version(vm *v);
/* The text an error answer gives (its fault_message, else the start of the body). */
void cl_fc_fault(const char *body, char *out, size_t n);

/* The guest agent channel (channel.c). v->chan.in holds IN_CAP bytes (chan.h). n bytes were
 * appended at chan.in + chan.in_len: handles every complete frame, closes the channel on a
 * violation. */
void cl_chan_input(vm *v, size_t n);

#endif
