/* Pure parsers for the vmrt agent protocol (see proto.h). */
#include "proto.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static void seterr(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static const char *msg_name(uint8_t t)
{
	switch (t) {
	case VMRT_HELLO: return "HELLO";
	case VMRT_STARTED: return "STARTED";
	case VMRT_STDOUT: return "STDOUT";
	case VMRT_STDERR: return "STDERR";
	case VMRT_EXIT: return "EXIT";
	case VMRT_ERROR: return "ERROR";
	case VMRT_PONG: return "PONG";
	case VMRT_RUN: return "RUN";
	case VMRT_STDIN: return "STDIN";
	case VMRT_STDIN_CLOSE: return "STDIN_CLOSE";
	case VMRT_SIGNAL: return "SIGNAL";
	case VMRT_RESIZE: return "RESIZE";
	case VMRT_SHUTDOWN: return "SHUTDOWN";
	case VMRT_EXEC: return "EXEC";
	case VMRT_PING: return "PING";
	default: return NULL;
	}
}

void vmrt_frame_header(uint8_t hdr[VMRT_HDR_LEN], uint8_t type, uint32_t len)
{
	vmrt_put16(hdr, (uint16_t)VMRT_MAGIC);
	hdr[2] = (uint8_t)VMRT_PROTO_VERSION;
	hdr[3] = type;
	vmrt_put32(hdr + 4, len);
}

long vmrt_frame_parse(const uint8_t *buf, size_t len, enum vmrt_dir dir,
		      struct vmrt_frame *out, char *err, size_t errlen)
{
	uint16_t magic;
	uint8_t type;
	uint32_t plen;
	const char *name;
	const uint8_t *p;
	int to_agent;

	if (len < VMRT_HDR_LEN)
		return 0;
	magic = vmrt_get16(buf);
	if (magic != VMRT_MAGIC) {
		seterr(err, errlen, "bad frame magic 0x%04x", magic);
		return -1;
	}
	if (buf[2] != VMRT_PROTO_VERSION) {
		seterr(err, errlen, "unsupported frame version %u", buf[2]);
		return -1;
	}
	type = buf[3];
	plen = vmrt_get32(buf + 4);
	if (plen > VMRT_MAX_PAYLOAD) {
		seterr(err, errlen, "frame of %lu bytes exceeds %u",
		       (unsigned long)plen, VMRT_MAX_PAYLOAD);
		return -1;
	}
	name = msg_name(type);
	if (!name) {
		seterr(err, errlen, "unknown frame type 0x%02x", type);
		return -1;
	}
	to_agent = type >= VMRT_RUN;
	if (to_agent != (dir == VMRT_TO_AGENT)) {
		seterr(err, errlen, "frame type %s not allowed in this direction", name);
		return -1;
	}
	if (len - VMRT_HDR_LEN < plen)
		return 0;
	p = buf + VMRT_HDR_LEN;

	switch (type) {
	case VMRT_SIGNAL:
	case VMRT_RESIZE:
	case VMRT_STARTED:
		if (plen != 4)
			goto badsize;
		break;
	case VMRT_STDIN_CLOSE:
	case VMRT_SHUTDOWN:
		if (plen != 0)
			goto badsize;
		break;
	case VMRT_PING:
	case VMRT_PONG:
		if (plen != 8)
			goto badsize;
		break;
	case VMRT_EXIT:
		if (plen != 12)
			goto badsize;
		if (vmrt_get32(p) > 255) {
			seterr(err, errlen, "EXIT status %lu out of range",
			       (unsigned long)vmrt_get32(p));
			return -1;
		}
		break;
	case VMRT_HELLO:
		if (plen < 20)
			goto badsize;
		if (memchr(p + 20, 0, plen - 20)) {
			seterr(err, errlen, "HELLO agent version contains NUL");
			return -1;
		}
		break;
	case VMRT_ERROR:
		if (plen < 4)
			goto badsize;
		if (memchr(p + 4, 0, plen - 4)) {
			seterr(err, errlen, "ERROR message contains NUL");
			return -1;
		}
		break;
	default: /* RUN, EXEC (checked by vmrt_run_parse), STDIN, STDOUT, STDERR */
		break;
	}
	if (out) {
		out->type = type;
		out->len = plen;
		out->payload = p;
	}
	return (long)(VMRT_HDR_LEN + plen);

badsize:
	seterr(err, errlen, "%s payload of %lu bytes has the wrong size", name,
	       (unsigned long)plen);
	return -1;
}

size_t vmrt_utf8_seq(const uint8_t *s, size_t n)
{
	uint8_t c = s[0];
	size_t k;
	uint32_t cp, min;

	if (c >= 0xC2 && c <= 0xDF) {
		k = 1; cp = c & 0x1F; min = 0x80;
	} else if (c >= 0xE0 && c <= 0xEF) {
		k = 2; cp = c & 0x0F; min = 0x800;
	} else if (c >= 0xF0 && c <= 0xF4) {
		k = 3; cp = c & 0x07; min = 0x10000;
	} else {
		return 0;
	}
	if (n <= k)
		return 0;
	for (size_t j = 1; j <= k; j++) {
		if ((s[j] & 0xC0) != 0x80)
			return 0;
		cp = cp << 6 | (s[j] & 0x3F);
	}
	if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
		return 0;
	return k + 1;
}

/* Strict UTF-8 (no overlongs, no surrogates, <= U+10FFFF). */
static int utf8_valid(const uint8_t *s, size_t n)
{
	size_t i = 0;

	while (i < n) {
		size_t k = s[i] < 0x80 ? 1 : vmrt_utf8_seq(s + i, n - i);

		if (k == 0)
			return 0;
		i += k;
	}
	return 1;
}

/* A non-empty relative path with no "." or ".." component. */
static int relative_clean(const char *s)
{
	const char *c = s;

	if (*s == '\0' || *s == '/')
		return 0;
	while (*c) {
		const char *e = c;
		while (*e && *e != '/')
			e++;
		if (e == c || (e - c == 1 && c[0] == '.') || (e - c == 2 && c[0] == '.' && c[1] == '.'))
			return 0;
		c = *e ? e + 1 : e;
	}
	return c[-1] != '/';
}

/* n bytes of zero. */
static int is_zero(const uint8_t *b, size_t n)
{
	for (size_t k = 0; k < n; k++)
		if (b[k])
			return 0;
	return 1;
}

/* An IPv6 address (16 bytes) that is neither multicast (ff00::/8) nor the
 * loopback ::1 (:: itself is checked by the caller where it is refused). */
static int ipv6_unicast(const uint8_t *a)
{
	return a[0] != 0xff && !(is_zero(a, 15) && a[15] == 1);
}

static const char *tag_name(uint8_t t)
{
	switch (t) {
	case VMRT_TAG_ARG: return "ARG";
	case VMRT_TAG_ENV: return "ENV";
	case VMRT_TAG_CWD: return "CWD";
	case VMRT_TAG_HOSTNAME: return "HOSTNAME";
	case VMRT_TAG_UID: return "UID";
	case VMRT_TAG_GID: return "GID";
	case VMRT_TAG_GROUPS: return "GROUPS";
	case VMRT_TAG_TTY: return "TTY";
	case VMRT_TAG_STDIN: return "STDIN";
	case VMRT_TAG_TIME: return "TIME";
	case VMRT_TAG_ROOTFS: return "ROOTFS";
	case VMRT_TAG_READONLY: return "READONLY";
	case VMRT_TAG_CAPS: return "CAPS";
	case VMRT_TAG_NO_NEW_PRIVS: return "NO_NEW_PRIVS";
	case VMRT_TAG_MOUNT: return "MOUNT";
	case VMRT_TAG_MOUNT_SOURCE: return "MOUNT_SOURCE";
	case VMRT_TAG_MOUNT_FLAGS: return "MOUNT_FLAGS";
	case VMRT_TAG_MOUNT_DATA: return "MOUNT_DATA";
	case VMRT_TAG_MEMORY_MAX: return "MEMORY_MAX";
	case VMRT_TAG_PIDS_MAX: return "PIDS_MAX";
	case VMRT_TAG_DETACH: return "DETACH";
	case VMRT_TAG_SHARE_9P: return "SHARE_9P";
	case VMRT_TAG_SEED: return "SEED";
	case VMRT_TAG_NET: return "NET";
	case VMRT_TAG_NET6: return "NET6";
	case VMRT_TAG_UPPER_DISK: return "UPPER_DISK";
	case VMRT_TAG_DISK_SCRATCH: return "DISK_SCRATCH";
	case VMRT_TAG_SHARE_FRESH: return "SHARE_FRESH";
	case VMRT_TAG_SECCOMP: return "SECCOMP";
	case VMRT_TAG_MASKED: return "MASKED";
	case VMRT_TAG_RLIMIT: return "RLIMIT";
	case VMRT_TAG_RO_PATH: return "RO_PATH";
	case VMRT_TAG_WALK_UPPER: return "WALK_UPPER";
	case VMRT_TAG_WALK_CONTENT: return "WALK_CONTENT";
	case VMRT_TAG_WALK_AFTER: return "WALK_AFTER";
	default: return "?";
	}
}

int vmrt_run_parse(const uint8_t *p, size_t len, struct vmrt_run *out,
		   char *err, size_t errlen)
{
	size_t i = 0, used = 0;

	if (len > VMRT_MAX_PAYLOAD) {
		seterr(err, errlen, "RUN payload of %zu bytes exceeds %u", len,
		       VMRT_MAX_PAYLOAD);
		return -1;
	}
	out->argc = out->envc = out->ngroups = 0;
	out->argv[0] = NULL;
	out->envp[0] = NULL;
	out->cwd = "/";
	out->hostname = "vmrt";
	out->rootfs = "rootfs";
	out->uid = out->gid = 0;
	out->tty = 0;
	out->rows = out->cols = 0;
	out->open_stdin = 0;
	out->has_time = 0;
	out->time_ns = 0;
	out->readonly = 0;
	out->has_caps = 0;
	out->caps = 0;
	out->no_new_privs = 0;
	out->nmounts = 0;
	out->memory_max = out->pids_max = 0;
	out->detach = 0;
	out->share_9p = 0;
	out->disk_scratch = 0;
	out->share_fresh = 0;
	out->seed_len = 0;
	out->has_net = 0;
	out->net_addr = out->net_gw = 0;
	out->net_prefix = 0;
	memset(out->net_mac, 0, sizeof out->net_mac);
	out->net_mtu = 0;
	out->has_net6 = 0;
	memset(out->net6_addr, 0, sizeof out->net6_addr);
	memset(out->net6_gw, 0, sizeof out->net6_gw);
	out->net6_prefix = 0;
	out->disk_size = 0;
	out->disk_dev[0] = '\0';
	out->seccomp_len = 0;
	out->nmasked = out->nro_paths = 0;
	out->walk = 0;
	out->walk_content = 0;
	out->walk_after = 0;
	out->nrlimits = 0;

	while (i < len) {
		uint8_t tag;
		uint32_t vlen;
		const uint8_t *v;
		char *s = NULL;

		if (len - i < 5) {
			seterr(err, errlen, "truncated RUN record header");
			return -1;
		}
		tag = p[i];
		vlen = vmrt_get32(p + i + 1);
		i += 5;
		if (vlen > len - i) {
			seterr(err, errlen, "RUN record longer than payload");
			return -1;
		}
		v = p + i;
		i += vlen;

		switch (tag) {
		case VMRT_TAG_ARG:
		case VMRT_TAG_ENV:
		case VMRT_TAG_CWD:
		case VMRT_TAG_HOSTNAME:
		case VMRT_TAG_ROOTFS:
		case VMRT_TAG_MOUNT:
		case VMRT_TAG_MOUNT_SOURCE:
		case VMRT_TAG_MOUNT_DATA:
		case VMRT_TAG_MASKED:
		case VMRT_TAG_RO_PATH:
			if (vlen > VMRT_MAX_STRING) {
				seterr(err, errlen, "RUN %s of %lu bytes exceeds %u",
				       tag_name(tag), (unsigned long)vlen, VMRT_MAX_STRING);
				return -1;
			}
			if (memchr(v, 0, vlen)) {
				seterr(err, errlen, "RUN %s contains NUL", tag_name(tag));
				return -1;
			}
			if (!utf8_valid(v, vlen)) {
				seterr(err, errlen, "RUN %s is not valid UTF-8", tag_name(tag));
				return -1;
			}
			/* vlen + 1 <= vlen + 5 bytes consumed, so this always fits
			 * a strings[] of len bytes; checked anyway. */
			if (sizeof(out->strings) - used < (size_t)vlen + 1) {
				seterr(err, errlen, "RUN strings overflow");
				return -1;
			}
			s = out->strings + used;
			memcpy(s, v, vlen);
			s[vlen] = '\0';
			used += (size_t)vlen + 1;
			break;
		default:
			break;
		}

		switch (tag) {
		case VMRT_TAG_ARG:
			if (out->argc >= VMRT_MAX_ARGS) {
				seterr(err, errlen, "more than %u ARG records", VMRT_MAX_ARGS);
				return -1;
			}
			out->argv[out->argc++] = s;
			out->argv[out->argc] = NULL;
			break;
		case VMRT_TAG_ENV:
			if (out->envc >= VMRT_MAX_ENV) {
				seterr(err, errlen, "more than %u ENV records", VMRT_MAX_ENV);
				return -1;
			}
			out->envp[out->envc++] = s;
			out->envp[out->envc] = NULL;
			break;
		case VMRT_TAG_CWD:
			if (s[0] != '/') {
				seterr(err, errlen, "RUN CWD is not an absolute path");
				return -1;
			}
			out->cwd = s;
			break;
		case VMRT_TAG_HOSTNAME:
			out->hostname = s;
			break;
		case VMRT_TAG_ROOTFS:
			out->rootfs = s;
			break;
		case VMRT_TAG_UID:
		case VMRT_TAG_GID:
			if (vlen != 4)
				goto badsize;
			if (tag == VMRT_TAG_UID)
				out->uid = vmrt_get32(v);
			else
				out->gid = vmrt_get32(v);
			break;
		case VMRT_TAG_GROUPS:
			if (vlen % 4)
				goto badsize;
			if (vlen / 4 > VMRT_MAX_GROUPS - out->ngroups) {
				seterr(err, errlen, "more than %u GROUPS", VMRT_MAX_GROUPS);
				return -1;
			}
			for (uint32_t k = 0; k < vlen; k += 4)
				out->groups[out->ngroups++] = vmrt_get32(v + k);
			break;
		case VMRT_TAG_TTY:
			if (vlen != 4)
				goto badsize;
			out->tty = 1;
			out->rows = vmrt_get16(v);
			out->cols = vmrt_get16(v + 2);
			break;
		case VMRT_TAG_STDIN:
		case VMRT_TAG_READONLY:
			if (vlen != 0)
				goto badsize;
			if (tag == VMRT_TAG_STDIN)
				out->open_stdin = 1;
			else
				out->readonly = 1;
			break;
		case VMRT_TAG_CAPS:
			if (vlen != 8)
				goto badsize;
			out->has_caps = 1;
			out->caps = vmrt_get64(v);
			break;
		case VMRT_TAG_NO_NEW_PRIVS:
		case VMRT_TAG_DETACH:
		case VMRT_TAG_WALK_UPPER:
		case VMRT_TAG_WALK_CONTENT:
		case VMRT_TAG_WALK_AFTER:
			if (vlen != 0)
				goto badsize;
			if (tag == VMRT_TAG_DETACH)
				out->detach = 1;
			else if (tag == VMRT_TAG_WALK_UPPER)
				out->walk = 1;
			else if (tag == VMRT_TAG_WALK_CONTENT)
				out->walk_content = 1;
			else if (tag == VMRT_TAG_WALK_AFTER)
				out->walk_after = 1;
			else
				out->no_new_privs = 1;
			break;
		case VMRT_TAG_SHARE_9P:
		case VMRT_TAG_DISK_SCRATCH:
		case VMRT_TAG_SHARE_FRESH:
			if (vlen != 0)
				goto badsize;
			if (tag == VMRT_TAG_SHARE_9P)
				out->share_9p = 1;
			else if (tag == VMRT_TAG_DISK_SCRATCH)
				out->disk_scratch = 1;
			else
				out->share_fresh = 1;
			break;
		case VMRT_TAG_SEED:
			if (vlen < VMRT_SEED_MIN || vlen > VMRT_SEED_MAX)
				goto badsize;
			memcpy(out->seed, v, vlen);
			out->seed_len = vlen;
			break;
		case VMRT_TAG_NET:
			/* u32 addr, u8 prefix, u32 gateway, 6 MAC, u16 MTU, u8 flags */
			if (vlen != VMRT_NET_LEN)
				goto badsize;
			if (out->has_net) {
				seterr(err, errlen, "more than one NET record");
				return -1;
			}
			if (v[4] < 1 || v[4] > 32) {
				seterr(err, errlen, "RUN NET prefix must be 1..32");
				return -1;
			}
			if (v[9] & 1) {
				seterr(err, errlen, "RUN NET MAC must not be multicast");
				return -1;
			}
			if (vmrt_get16(v + 15) != 0 && vmrt_get16(v + 15) < VMRT_NET_MTU_MIN) {
				seterr(err, errlen, "RUN NET MTU must be 0 or %u..65535", VMRT_NET_MTU_MIN);
				return -1;
			}
			if (v[17] != 0) {
				seterr(err, errlen, "RUN NET flags must be 0");
				return -1;
			}
			out->has_net = 1;
			memcpy(&out->net_addr, v, 4); /* stays in network byte order */
			out->net_prefix = v[4];
			memcpy(&out->net_gw, v + 5, 4);
			memcpy(out->net_mac, v + 9, 6);
			out->net_mtu = vmrt_get16(v + 15);
			break;
		case VMRT_TAG_NET6:
			/* 16 address, u8 prefix, 16 gateway (all zero: none) */
			if (vlen != VMRT_NET6_LEN)
				goto badsize;
			if (out->has_net6) {
				seterr(err, errlen, "more than one NET6 record");
				return -1;
			}
			if (is_zero(v, 16) || !ipv6_unicast(v)) {
				seterr(err, errlen, "RUN NET6 address must be unicast");
				return -1;
			}
			if (v[16] < 1 || v[16] > 128) {
				seterr(err, errlen, "RUN NET6 prefix must be 1..128");
				return -1;
			}
			if (!is_zero(v + 17, 16) && !ipv6_unicast(v + 17)) {
				seterr(err, errlen, "RUN NET6 gateway must be unicast");
				return -1;
			}
			out->has_net6 = 1;
			memcpy(out->net6_addr, v, 16);
			out->net6_prefix = v[16];
			memcpy(out->net6_gw, v + 17, 16);
			break;
		case VMRT_TAG_UPPER_DISK:
			/* u64 capacity in bytes, then the device's name under /dev */
			if (vlen < 9 || vlen > 8 + VMRT_DISK_NAME_MAX)
				goto badsize;
			if (out->disk_size) {
				seterr(err, errlen, "more than one UPPER_DISK record");
				return -1;
			}
			if (vmrt_get64(v) == 0 || vmrt_get64(v) % 512) {
				seterr(err, errlen, "RUN UPPER_DISK capacity must be whole 512-byte sectors");
				return -1;
			}
			for (uint32_t k = 8; k < vlen; k++) {
				if (!((v[k] >= 'a' && v[k] <= 'z') || (v[k] >= '0' && v[k] <= '9'))) {
					seterr(err, errlen, "RUN UPPER_DISK device name must be [a-z0-9]");
					return -1;
				}
			}
			out->disk_size = vmrt_get64(v);
			memcpy(out->disk_dev, v + 8, vlen - 8);
			out->disk_dev[vlen - 8] = '\0';
			break;
		case VMRT_TAG_TIME:
			if (vlen != 8)
				goto badsize;
			out->has_time = 1;
			out->time_ns = vmrt_get64(v);
			break;
		case VMRT_TAG_MEMORY_MAX:
		case VMRT_TAG_PIDS_MAX:
			if (vlen != 8)
				goto badsize;
			if (tag == VMRT_TAG_MEMORY_MAX)
				out->memory_max = vmrt_get64(v);
			else
				out->pids_max = vmrt_get64(v);
			break;
		case VMRT_TAG_MOUNT:
			if (out->nmounts >= VMRT_MAX_MOUNTS) {
				seterr(err, errlen, "more than %u MOUNT records", VMRT_MAX_MOUNTS);
				return -1;
			}
			if (s[0] != '/') {
				seterr(err, errlen, "RUN MOUNT target is not an absolute path");
				return -1;
			}
			out->mounts[out->nmounts].target = s;
			out->mounts[out->nmounts].source = NULL;
			out->mounts[out->nmounts].data = "";
			out->mounts[out->nmounts].flags = 0;
			out->nmounts++;
			break;
		case VMRT_TAG_MOUNT_SOURCE:
		case VMRT_TAG_MOUNT_DATA:
		case VMRT_TAG_MOUNT_FLAGS:
			if (out->nmounts == 0) {
				seterr(err, errlen, "RUN %s before any MOUNT", tag_name(tag));
				return -1;
			}
			if (tag == VMRT_TAG_MOUNT_DATA) {
				out->mounts[out->nmounts - 1].data = s;
			} else if (tag == VMRT_TAG_MOUNT_SOURCE) {
				if (!relative_clean(s)) {
					seterr(err, errlen, "RUN MOUNT_SOURCE must be relative without \"..\"");
					return -1;
				}
				out->mounts[out->nmounts - 1].source = s;
			} else {
				if (vlen != 4)
					goto badsize;
				if (vmrt_get32(v) & ~(uint32_t)VMRT_MNT_ALL) {
					seterr(err, errlen, "RUN MOUNT_FLAGS has unknown bits");
					return -1;
				}
				out->mounts[out->nmounts - 1].flags = vmrt_get32(v);
			}
			break;
		case VMRT_TAG_SECCOMP:
			if (out->seccomp_len) {
				seterr(err, errlen, "more than one SECCOMP record");
				return -1;
			}
			if (vlen == 0 || vlen % 8 || vlen > VMRT_SECCOMP_MAX)
				goto badsize;
			memcpy(out->seccomp, v, vlen);
			out->seccomp_len = vlen;
			break;
		case VMRT_TAG_RLIMIT: {
			uint32_t res;
			uint64_t soft, hard;

			if (vlen != 20)
				goto badsize;
			res = vmrt_get32(v);
			soft = vmrt_get64(v + 4);
			hard = vmrt_get64(v + 12);
			if (res >= VMRT_MAX_RLIMITS || soft > hard) {
				seterr(err, errlen, "RUN RLIMIT %lu: an unknown resource or a soft limit above the hard one",
				       (unsigned long)res);
				return -1;
			}
			for (size_t k = 0; k < out->nrlimits; k++) {
				if (out->rlimits[k].resource == res) {
					seterr(err, errlen, "RUN RLIMIT %lu given twice", (unsigned long)res);
					return -1;
				}
			}
			out->rlimits[out->nrlimits].resource = res;
			out->rlimits[out->nrlimits].soft = soft;
			out->rlimits[out->nrlimits].hard = hard;
			out->nrlimits++;
			break;
		}
		case VMRT_TAG_MASKED:
		case VMRT_TAG_RO_PATH: {
			size_t *n = tag == VMRT_TAG_MASKED ? &out->nmasked : &out->nro_paths;
			const char **list = tag == VMRT_TAG_MASKED ? out->masked : out->ro_paths;

			if (*n >= VMRT_MAX_PATHS) {
				seterr(err, errlen, "more than %u %s records", VMRT_MAX_PATHS, tag_name(tag));
				return -1;
			}
			if (s[0] != '/' || (s[1] != '\0' && !relative_clean(s + 1))) {
				seterr(err, errlen, "RUN %s must be an absolute path without \"..\"", tag_name(tag));
				return -1;
			}
			list[(*n)++] = s;
			break;
		}
		default:
			break; /* unknown tags are skipped */
		}
		continue;
badsize:
		seterr(err, errlen, "RUN %s record of %lu bytes has the wrong size",
		       tag_name(tag), (unsigned long)vlen);
		return -1;
	}
	if (out->argc == 0) {
		seterr(err, errlen, "RUN without ARG");
		return -1;
	}
	if (out->has_net6 && !out->has_net) {
		seterr(err, errlen, "RUN NET6 without NET");
		return -1;
	}
	if (out->disk_scratch && !out->disk_size) {
		seterr(err, errlen, "RUN DISK_SCRATCH without UPPER_DISK");
		return -1;
	}
	if (out->walk && (out->tty || out->detach)) {
		seterr(err, errlen, "RUN WALK_UPPER with TTY or DETACH");
		return -1;
	}
	if (out->walk_content && !out->walk) {
		seterr(err, errlen, "RUN WALK_CONTENT without WALK_UPPER");
		return -1;
	}
	if (out->walk_after && (out->walk || out->tty)) {
		seterr(err, errlen, "RUN WALK_AFTER with WALK_UPPER or TTY");
		return -1;
	}
	if (out->share_fresh && !out->share_9p) {
		seterr(err, errlen, "RUN SHARE_FRESH without SHARE_9P");
		return -1;
	}
	for (size_t k = 0; k < out->nmounts; k++) {
		if (!(out->mounts[k].flags & VMRT_MNT_TMPFS) && out->mounts[k].source == NULL) {
			seterr(err, errlen, "RUN MOUNT %s (a bind) has no MOUNT_SOURCE", out->mounts[k].target);
			return -1;
		}
	}
	return 0;
}
