// What the emulated GPU tests share: the platform they emulate and the check counter.
#pragma once

#include <cstdio>
#include <string>

namespace emulated {

#if defined(ARWKV_HIP)
inline const char* kPlatform = "hip tiles, 64-lane waves";
#else
inline const char* kPlatform = "cuda tiles, 32-lane warps";
#endif

inline int failures = 0, checks = 0;

// Counts a check and reports a failure at once (flushed: a store far out of bounds may crash
// the test later).
inline void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: %s\n", kPlatform, what.c_str());
    std::fflush(stdout);
  }
}

}  // namespace emulated
