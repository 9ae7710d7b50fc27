// Shared helpers for the C++ CPU kernels: denormal control, OpenMP helpers, error type.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace hfc {

// Sets flush-to-zero and denormals-are-zero for the current thread while alive, restoring the previous
// mode on exit. Near one-hot responsibilities underflow into the denormal range and make arithmetic on them
// several times slower; every kernel thread holds one of these.
class DenormalGuard {
 public:
  DenormalGuard() {
#if defined(__SSE__) || defined(__x86_64__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#endif
  }
  ~DenormalGuard() {
#if defined(__SSE__) || defined(__x86_64__)
    _mm_setcsr(saved_);
#endif
  }
  DenormalGuard(const DenormalGuard&) = delete;
  DenormalGuard& operator=(const DenormalGuard&) = delete;

 private:
  unsigned int saved_ = 0;
};

// Thrown by kernels on invalid arguments; bound to Python ValueError.
struct ArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline void require(bool ok, const std::string& message) {
  if (!ok) throw ArgumentError(message);
}

}  // namespace hfc
