#pragma once

// Exit codes of the env contract (docs/env-contract.md, "Exit codes") that launchers, agents
// and the coordinator act on. One definition, read by rank programs and by whoever supervises
// them.

namespace muster {

// A rank whose collective failed because a peer died or stopped answering exits with this
// (EX_TEMPFAIL of sysexits.h: not this rank's fault; retrying the attempt may succeed). The
// launcher and the coordinator then report the first rank that failed otherwise, not its
// victims.
inline constexpr int kPeerFailureExitCode = 75;

}  // namespace muster
