// AECORE_CHECK(cond, parts...): TORCH_CHECK with the message built as one string here,
// numbers through std::to_string, never an iostream. On a machine whose build of this
// extension formatted numbers through a libstdc++ other than the process's (seen on a
// GPU machine: ostream << long called a codecvt facet), c10::str's ostringstream
// crashed where the check should have raised.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace aecore {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, std::string_view v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }

template <class... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace detail
}  // namespace aecore

#define AECORE_CHECK(cond, ...) TORCH_CHECK(cond, ::aecore::detail::message(__VA_ARGS__))
