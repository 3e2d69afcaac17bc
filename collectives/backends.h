#pragma once

// The backend factories behind CreateCommunicator (communicator.cc). Each exists in every
// build; one whose library was not built returns FailedPrecondition naming its CMake option.

#include <memory>

#include "collectives/communicator.h"

namespace muster::collectives::internal {

// InvalidArgument naming the collective and the type when !IsReducible(type).
Status CheckReducible(std::string_view collective, DType type);

// A Work already done with `status`: a collective refused before it was issued, which does not
// fail the communicator.
std::unique_ptr<Work> FinishedWork(Status status);

StatusOr<std::unique_ptr<Communicator>> NewGlooCommunicator(std::shared_ptr<RendezvousStore> store,
                                                            CommConfig config);
StatusOr<std::unique_ptr<Communicator>> NewNcclCommunicator(std::shared_ptr<RendezvousStore> store,
                                                            CommConfig config);
// MPI ignores `store`: it wires itself up through mpirun.
StatusOr<std::unique_ptr<Communicator>> NewMpiCommunicator(std::shared_ptr<RendezvousStore> store,
                                                           CommConfig config);

}  // namespace muster::collectives::internal
