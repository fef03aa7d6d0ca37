/* Helpers compiled into both the guest agent (guest-agent/) and the host
 * monitor (monitor/): the clock their timers read and the format of the
 * diagnostic lines they write to stderr (the console, or monitor.log).
 * Formatting only: each caller writes the line itself, so the monitor's fuzz
 * harness still catches those writes. */
#ifndef VMRT_UTIL_H
#define VMRT_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* Nanoseconds on clock c. */
uint64_t clock_ns(clockid_t c);

/* Milliseconds on CLOCK_MONOTONIC: what every deadline is measured in. */
int64_t now_ms(void);

/* One diagnostic line into buf: prefix, the message, '\n' (the message cut so
 * that the line fits size - 1 bytes; not NUL-terminated).  Returns its length. */
size_t logline_format(char *buf, size_t size, const char *prefix, const char *fmt, va_list ap)
	__attribute__((format(printf, 4, 0)));

#endif
