// What the CPU kernels share to pick an AVX2 + FMA clone of an inner loop at run time: the
// clone is a function marked __attribute__((target("avx2,fma"))) that calls an always-inlined
// template (so the template is compiled for AVX2 inside it), chosen when cpu_has_avx2_fma().
#pragma once

#if defined(__GNUC__)
#define AUTOFPN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define AUTOFPN_ALWAYS_INLINE inline
#endif

#if defined(__GNUC__) && defined(__x86_64__)
namespace autofpn {
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
}  // namespace autofpn
#endif
