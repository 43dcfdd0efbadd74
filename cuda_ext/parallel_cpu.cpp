// Whether this extension's at::parallel_for runs on torch's threads.
//
// at::parallel_for is a header template (ATen/Parallel-inl.h): it only splits the work when the
// extension itself is compiled and linked with -fopenmp (setup.py); without, every CPU kernel
// here runs its loop serially, with no error. This op reports how many threads took a share of
// a parallel_for over n items, so a test can tell (tests/test_extension_parallel.py).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

namespace autofpn {
namespace {

int64_t parallel_for_threads(int64_t n) {
  std::atomic<int64_t> seen{0};  // bit t: thread t ran a chunk
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { seen |= int64_t(1) << (at::get_thread_num() % 63); });
  return __builtin_popcountll(static_cast<uint64_t>(seen.load()));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autofpn, m) {
  m.def("parallel_for_threads(int n) -> int", &parallel_for_threads);  // no tensors: one kernel for all
}

}  // namespace autofpn
