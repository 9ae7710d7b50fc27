#include "harness.h"

int main() {
  int failed_cases = 0;
  for (const auto& c : hfc_test::registry()) {
    const int before = hfc_test::failures();
    c.fn();
    const bool ok = hfc_test::failures() == before;
    failed_cases += ok ? 0 : 1;
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", c.name);
  }
  const int total = static_cast<int>(hfc_test::registry().size());
  std::printf("%d passed, %d failed\n", total - failed_cases, failed_cases);
  return failed_cases == 0 ? 0 : 1;
}
