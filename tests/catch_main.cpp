// The Catch2 main shared by every test program: Catch's own session, then
// exit 77 (ctest's SKIP_RETURN_CODE for these tests) when a test case
// skipped through VQKIT_SKIP and none failed (tests/skip.hpp).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

#include "skip.hpp"

int main(int argc, char** argv) {
  const int rc = Catch::Session().run(argc, argv);
  const int skipped = vqkit::test::skipped_tests().load();
  if (rc == 0 && skipped > 0) {
    std::printf("%d test case(s) skipped (VQKIT_SKIP): exit %d\n", skipped,
                vqkit::test::kSkipReturnCode);
    return vqkit::test::kSkipReturnCode;
  }
  return rc;
}
