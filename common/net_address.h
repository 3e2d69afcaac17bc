#pragma once

// Local network addresses: which of this host's addresses reaches a peer, and whether a TCP
// port is free to bind. The one home of these helpers (the agent picks its advertised address
// with LocalAddressFor, a rank its communicator's host with LocalAddressToward).
//
// Thread-safety: pure functions (each opens and closes a socket of its own; no packet is sent).

#include <string>

namespace muster {

// The local IPv4 address whose route reaches `host` (a name or an address), found with a UDP
// connect to `host`:`port` (no packet sent). "127.0.0.1" when `host` is empty, "*", "0.0.0.0",
// "localhost", a 127.x address, or cannot be resolved or routed.
std::string LocalAddressToward(const std::string& host, const std::string& port = "9");

// LocalAddressToward the host of `endpoint` ("tcp://HOST:PORT", "HOST:PORT" or "HOST"; no
// port: 7070, the coordinator's default).
std::string LocalAddressFor(const std::string& endpoint);

// Whether a TCP listener could not bind `port` on `address` (IPv4; empty, "*" or "0.0.0.0":
// every address) because something holds it: a bind test with SO_REUSEADDR, as ZeroMQ and
// torch's TCPStore bind, so a port only in TIME_WAIT counts as free. False for a name that is
// not an address (the bind itself will tell).
bool TcpPortInUse(const std::string& address, int port);

}  // namespace muster
