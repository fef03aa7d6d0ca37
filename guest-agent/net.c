/* The VM's network (agent.h): lo, and eth0 as the RUN's NET record says. */
#include "agent.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
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

/* Loopback up (the kernel adds 127.0.0.1/8 itself); with NET, eth0 (the VM's
 * only virtio-net NIC) gets its MAC, MTU, address and netmask, comes up and
 * gets a default route via the gateway.  Plain ioctls, no netlink.  Without
 * NET, eth0 stays down. */
void setup_network(void)
{
	char dev[IFNAMSIZ] = "eth0";
	struct ifreq ifr;
	struct rtentry rt;
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
}
