// A minimal test harness for the C++ kernel tests (no external framework, nothing downloaded).
// TEST(name) { CHECK(cond); CHECK_NEAR(a, b, tol); } -- tests self-register; main() is in main.cpp.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace hfc_test {

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

inline int& failures() {
  static int count = 0;
  return count;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

}  // namespace hfc_test

#define TEST(name)                                                         \
  static void name();                                                      \
  static hfc_test::Registrar name##_registrar(#name, name);                \
  static void name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::printf("  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);          \
      ++hfc_test::failures();                                                         \
    }                                                                                 \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                                  \
  do {                                                                                         \
    const double a_ = (a), b_ = (b);                                                           \
    if (!(std::fabs(a_ - b_) <= (tol))) {                                                      \
      std::printf("  %s:%d: |%s - %s| = |%.9g - %.9g| > %g\n", __FILE__, __LINE__, #a, #b, a_, \
                  b_, (double)(tol));                                                          \
      ++hfc_test::failures();                                                                  \
    }                                                                                          \
  } while (0)
