// Honest skips for vqkit's Catch2 v2 tests (Catch2 v2 has no SKIP; a test
// that returns early counts as passed).
//
// VQKIT_SKIP("why") inside a TEST_CASE prints the reason, counts the skip
// and returns from the test case. tests/catch_main.cpp then exits with
// kSkipReturnCode (77) when the run skipped something and failed nothing,
// and tests/CMakeLists.txt gives every discovered test SKIP_RETURN_CODE 77,
// so ctest reports such a test as "Skipped", never "Passed". (ctest runs one
// test case per process; a whole test program run by hand also exits 77
// when any of its test cases skipped.)
#pragma once

#include <atomic>

#include <catch2/catch.hpp>

namespace vqkit::test {

inline constexpr int kSkipReturnCode = 77;

/// Test cases skipped in this process.
inline std::atomic<int>& skipped_tests() {
  static std::atomic<int> n{0};
  return n;
}

}  // namespace vqkit::test

#define VQKIT_SKIP(reason)                       \
  do {                                           \
    WARN("SKIPPED: " << reason);                 \
    ++::vqkit::test::skipped_tests();            \
    return;                                      \
  } while (0)
