/* The VM's network (agent.h): lo, and eth0 as the RUN's NET record says. */
#include "agent.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/ipv6.h> /* struct in6_ifreq */
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

/* Set (up) or clear IFF_UP on an interface; -1 with errno on failure. */
static int if_set_up(int fd, const char *name, int up)
{
	struct ifreq ifr;

	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		return -1;
	if (!!(ifr.ifr_flags & IFF_UP) == up)
		return 0;
	if (up)
		ifr.ifr_flags |= IFF_UP;
	else
		ifr.ifr_flags &= ~IFF_UP;
	return ioctl(fd, SIOCSIFFLAGS, &ifr);
}

/* An AF_INET address (network byte order) into a struct sockaddr. */
static void put_inaddr(struct sockaddr *sa, uint32_t addr)
{
	struct sockaddr_in sin;

	memset(&sin, 0, sizeof sin);
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = addr;
	memcpy(sa, &sin, sizeof sin);
}

/* One of eth0's IPv6 settings (/proc/sys/net/ipv6/conf/<dev>/<key>); -1 with
 * errno on failure (ENOENT: a kernel without IPv6). */
static int ipv6_conf(const char *dev, const char *key, const char *value)
{
	char path[96];

	snprintf(path, sizeof path, "/proc/sys/net/ipv6/conf/%s/%s", dev, key);
	return write_file(path, value);
}

/* NET6: eth0 (up) gets the IPv6 address and, with a gateway, a default route,
 * with ioctls on an AF_INET6 socket as for IPv4 (duplicate address detection
 * was turned off before eth0 came up). */
static void setup_ipv6(const char *dev, int ifindex)
{
	struct in6_ifreq ifr6;
	struct in6_rtmsg rt6;
	static const uint8_t zero[16];
	int fd = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		fatal(125, "network: IPv6 socket: %s", strerror(errno));
	memset(&ifr6, 0, sizeof ifr6);
	memcpy(&ifr6.ifr6_addr, run.net6_addr, 16);
	ifr6.ifr6_prefixlen = run.net6_prefix;
	ifr6.ifr6_ifindex = ifindex;
	if (ioctl(fd, SIOCSIFADDR, &ifr6) < 0)
		fatal(125, "network: cannot set the IPv6 address of %s: %s", dev, strerror(errno));
	if (memcmp(run.net6_gw, zero, 16) != 0) {
		memset(&rt6, 0, sizeof rt6);
		memcpy(&rt6.rtmsg_gateway, run.net6_gw, 16);
		rt6.rtmsg_dst_len = 0; /* ::/0 */
		rt6.rtmsg_metric = 1024; /* what ip(8) gives a route: as in process mode */
		rt6.rtmsg_flags = RTF_UP | RTF_GATEWAY;
		rt6.rtmsg_ifindex = ifindex;
		if (ioctl(fd, SIOCADDRT, &rt6) < 0)
			fatal(125, "network: cannot add the default IPv6 route: %s", strerror(errno));
	}
	close(fd);
}

/* Loopback up (the kernel adds 127.0.0.1/8 and ::1 itself); with NET, eth0
 * (the VM's only virtio-net NIC) gets its MAC, MTU, address and netmask, comes
 * up and gets a default route via the gateway; with NET6 also its IPv6 address
 * and route (no duplicate address detection), without NET6 IPv6 is off on it
 * (as Docker does on a network without IPv6: only lo has ::1).  Plain ioctls
 * and /proc/sys, no netlink.  Without NET, eth0 stays down. */
void setup_network(void)
{
	char dev[IFNAMSIZ] = "eth0";
	struct ifreq ifr;
	struct rtentry rt;
	int ifindex = 0;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (fd < 0) {
		if (run.has_net)
			fatal(125, "network: socket: %s", strerror(errno));
		con("cannot bring up lo: socket: %s", strerror(errno));
		return;
	}
	if (if_set_up(fd, "lo", 1) < 0)
		con("cannot bring up lo: %s", strerror(errno));
	if (!run.has_net) {
		close(fd);
		return;
	}

	memset(&ifr, 0, sizeof ifr);
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", dev);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		fatal(125, "network: no eth0 in the VM: %s", strerror(errno));
	if (if_set_up(fd, dev, 0) < 0)
		fatal(125, "network: cannot take eth0 down: %s", strerror(errno));
	ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
	memcpy(ifr.ifr_hwaddr.sa_data, run.net_mac, sizeof run.net_mac);
	if (ioctl(fd, SIOCSIFHWADDR, &ifr) < 0)
		fatal(125, "network: cannot set the MAC address of eth0: %s", strerror(errno));
	if (run.net_mtu) {
		ifr.ifr_mtu = run.net_mtu;
		if (ioctl(fd, SIOCSIFMTU, &ifr) < 0)
			fatal(125, "network: cannot set the MTU of eth0 to %u: %s", run.net_mtu,
			      strerror(errno));
	}
	put_inaddr(&ifr.ifr_addr, run.net_addr);
	if (ioctl(fd, SIOCSIFADDR, &ifr) < 0)
		fatal(125, "network: cannot set the address of eth0: %s", strerror(errno));
	put_inaddr(&ifr.ifr_netmask, htonl(0xffffffffu << (32 - run.net_prefix)));
	if (ioctl(fd, SIOCSIFNETMASK, &ifr) < 0)
		fatal(125, "network: cannot set the netmask of eth0: %s", strerror(errno));
	/* before eth0 comes up: its link-local address is made then (probed for
	 * duplicates unless accept_dad is 0), or not at all with IPv6 off */
	if (run.has_net6) {
		if (ipv6_conf(dev, "accept_dad", "0") < 0)
			fatal(125, "network: cannot turn off DAD on eth0: %s", strerror(errno));
		if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0)
			fatal(125, "network: no index for eth0: %s", strerror(errno));
		ifindex = ifr.ifr_ifindex;
	} else if (ipv6_conf(dev, "disable_ipv6", "1") < 0 && errno != ENOENT) {
		fatal(125, "network: cannot turn IPv6 off on eth0: %s", strerror(errno));
	}
	if (if_set_up(fd, dev, 1) < 0)
		fatal(125, "network: cannot bring up eth0: %s", strerror(errno));
	if (run.net_gw) {
		memset(&rt, 0, sizeof rt);
		put_inaddr(&rt.rt_dst, 0);
		put_inaddr(&rt.rt_genmask, 0);
		put_inaddr(&rt.rt_gateway, run.net_gw);
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		rt.rt_dev = dev;
		if (ioctl(fd, SIOCADDRT, &rt) < 0)
			fatal(125, "network: cannot add the default route: %s", strerror(errno));
	}
	close(fd);
	if (run.has_net6)
		setup_ipv6(dev, ifindex);
}
