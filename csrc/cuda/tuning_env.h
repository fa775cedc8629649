// The CUDA kernels' tuning knobs: environment variables read on the host when a kernel is
// launched (so when a CUDA graph is captured). README "Tuning knobs" lists them.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace hippo {

// A switch: unset or empty gives the fallback, "0" off, anything else on.
inline bool env_flag(const char* name, bool fallback = false) {
  const char* value = std::getenv(name);
  if (value == nullptr || value[0] == '\0') return fallback;
  return value[0] != '0';
}

// A positive integer; unset, unparsable or not positive gives the fallback.
inline int64_t env_int(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  const int64_t parsed = value != nullptr ? std::atoll(value) : 0;
  return parsed > 0 ? parsed : fallback;
}

// Whether the variable is set to exactly `expected`.
inline bool env_is(const char* name, const char* expected) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, expected) == 0;
}

}  // namespace hippo
