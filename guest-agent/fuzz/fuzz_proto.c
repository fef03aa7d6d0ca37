/* libFuzzer target for the pure protocol parsers (proto.c).
 *
 * The input is used three ways:
 *  1. as a RUN payload for vmrt_run_parse, checking the result's invariants;
 *  2. as a host->agent byte stream, parsed once in one piece and once fed
 *     incrementally in chunks (sizes drawn from the input) through a
 *     VMRT_FRAME_MAX buffer the way the agent does; both must see the same
 *     frames and end the same way; every RUN and EXEC frame is decoded too;
 *  3. the same for the agent->host direction.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"

static struct vmrt_run run;

static void check(int cond)
{
	if (!cond)
		__builtin_trap();
}

/* no "/", "." or ".." component anywhere, not absolute, not empty */
static int clean_relative(const char *s)
{
	size_t n;

	if (!s || !*s || *s == '/')
		return 0;
	n = strlen(s);
	if (s[n - 1] == '/' || strstr(s, "//") || !strcmp(s, ".") || !strcmp(s, "..") ||
	    !strncmp(s, "./", 2) || !strncmp(s, "../", 3) || strstr(s, "/./") || strstr(s, "/../"))
		return 0;
	if ((n >= 2 && !strcmp(s + n - 2, "/.")) || (n >= 3 && !strcmp(s + n - 3, "/..")))
		return 0;
	return 1;
}

static void check_run(const uint8_t *p, size_t n)
{
	char err[128];

	if (vmrt_run_parse(p, n, &run, err, sizeof err) < 0) {
		check(memchr(err, 0, sizeof err) != NULL);
		return;
	}
	check(run.argc >= 1 && run.argc <= VMRT_MAX_ARGS && run.argv[run.argc] == NULL);
	check(run.envc <= VMRT_MAX_ENV && run.envp[run.envc] == NULL);
	check(run.ngroups <= VMRT_MAX_GROUPS);
	check(run.cwd[0] == '/');
	size_t total = 0;
	for (size_t i = 0; i < run.argc; i++) {
		size_t l = strlen(run.argv[i]);
		check(l <= VMRT_MAX_STRING);
		total += l + 1;
	}
	for (size_t i = 0; i < run.envc; i++)
		total += strlen(run.envp[i]) + 1;
	check(total <= n);
	(void)strlen(run.hostname);
	(void)strlen(run.rootfs);
	check(run.detach == 0 || run.detach == 1);
	check(run.walk == 0 || (run.walk == 1 && !run.tty && !run.detach));
	check(run.nmounts <= VMRT_MAX_MOUNTS);
	for (size_t i = 0; i < run.nmounts; i++) {
		const struct vmrt_mount *m = &run.mounts[i];
		check(m->target[0] == '/');
		check((m->flags & ~(uint32_t)VMRT_MNT_ALL) == 0);
		check((m->flags & VMRT_MNT_TMPFS) || clean_relative(m->source));
		(void)strlen(m->data);
	}
	check(run.has_net == 0 || run.has_net == 1);
	if (run.has_net) {
		check(run.net_prefix >= 1 && run.net_prefix <= 32);
		check((run.net_mac[0] & 1) == 0);
		check(run.net_mtu == 0 || run.net_mtu >= VMRT_NET_MTU_MIN);
	}
}

/* FNV-1a over what a parse saw */
static uint64_t mix(uint64_t h, const void *p, size_t n)
{
	const uint8_t *b = p;
	for (size_t i = 0; i < n; i++)
		h = (h ^ b[i]) * 1099511628211ull;
	return h;
}

static uint64_t mix_frame(uint64_t h, const struct vmrt_frame *f)
{
	check(f->len <= VMRT_MAX_PAYLOAD);
	h = mix(h, &f->type, 1);
	h = mix(h, &f->len, sizeof f->len);
	return mix(h, f->payload, f->len);
}

struct outcome {
	uint64_t hash;
	size_t frames;
	int error;
	size_t pending;
};

static struct outcome whole(const uint8_t *d, size_t n, enum vmrt_dir dir)
{
	struct outcome o = { 14695981039346656037ull, 0, 0, 0 };
	struct vmrt_frame f;
	char err[128];
	size_t off = 0;

	for (;;) {
		long r = vmrt_frame_parse(d + off, n - off, dir, &f, err, sizeof err);
		if (r < 0) {
			o.error = 1;
			break;
		}
		if (r == 0) {
			o.pending = n - off;
			break;
		}
		check((size_t)r == VMRT_HDR_LEN + f.len && (size_t)r <= n - off);
		check(f.payload == d + off + VMRT_HDR_LEN);
		o.hash = mix_frame(o.hash, &f);
		o.frames++;
		if (f.type == VMRT_RUN || f.type == VMRT_EXEC)
			check_run(f.payload, f.len);
		if (f.type == VMRT_PING || f.type == VMRT_PONG)
			check(f.len == 8 && (f.type == VMRT_PING) == (dir == VMRT_TO_AGENT));
		off += (size_t)r;
	}
	return o;
}

static uint8_t sbuf[VMRT_FRAME_MAX];

static struct outcome chunked(const uint8_t *d, size_t n, enum vmrt_dir dir, uint32_t seed)
{
	struct outcome o = { 14695981039346656037ull, 0, 0, 0 };
	struct vmrt_frame f;
	char err[128];
	size_t off = 0, blen = 0;

	while (off < n) {
		/* xorshift chunk sizes: mostly small, sometimes big */
		seed ^= seed << 13;
		seed ^= seed >> 17;
		seed ^= seed << 5;
		size_t c = (seed & 7) == 0 ? (seed >> 8) % 70000 + 1 : (seed >> 8) % 17 + 1;
		if (c > n - off)
			c = n - off;
		if (c > sizeof sbuf - blen)
			c = sizeof sbuf - blen;
		check(c > 0); /* a frame always fits: the buffer never fills up */
		memcpy(sbuf + blen, d + off, c);
		blen += c;
		off += c;
		for (;;) {
			long r = vmrt_frame_parse(sbuf, blen, dir, &f, err, sizeof err);
			if (r < 0) {
				o.error = 1;
				return o;
			}
			if (r == 0)
				break;
			o.hash = mix_frame(o.hash, &f);
			o.frames++;
			memmove(sbuf, sbuf + r, blen - (size_t)r);
			blen -= (size_t)r;
		}
	}
	o.pending = blen;
	return o;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint32_t seed = 0x9e3779b9u ^ (uint32_t)size;

	if (size > 0)
		seed ^= (uint32_t)data[size - 1] << 24 | (uint32_t)data[0];
	if (size <= VMRT_MAX_PAYLOAD)
		check_run(data, size);
	for (int dir = VMRT_TO_AGENT; dir <= VMRT_TO_HOST; dir++) {
		struct outcome a = whole(data, size, (enum vmrt_dir)dir);
		struct outcome b = chunked(data, size, (enum vmrt_dir)dir, seed | 1);
		check(a.error == b.error && a.frames == b.frames && a.hash == b.hash);
		if (!a.error)
			check(a.pending == b.pending);
	}
	return 0;
}
