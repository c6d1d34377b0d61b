// Choosing among kernels compiled once per ISA (AVX-512, AVX2 + FMA, the baseline),
// for the custom calls in this directory: each keeps a table of its kernels, best
// first, and runs the best one this CPU has; tests switch to the others.
#ifndef AMOS_JAX_NATIVE_ISA_H_
#define AMOS_JAX_NATIVE_ISA_H_

#include <cstddef>
#include <cstring>

namespace amos_native {

// The best ISA this CPU runs among those the kernels are compiled for.
inline const char* CpuIsa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return "avx512";
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
#endif
  return "generic";
}

// The entry of `table` (entries with a `name`, best first, "generic" last) for
// this CPU.
template <typename Kernels, size_t K>
Kernels Best(const Kernels (&table)[K]) {
  for (const Kernels& k : table)
    if (std::strcmp(k.name, CpuIsa()) == 0) return k;
  return table[K - 1];
}

// Sets *chosen to the entry named `name` if this CPU runs it; false otherwise.
template <typename Kernels, size_t K>
bool Use(const Kernels (&table)[K], const char* name, Kernels* chosen) {
  bool reachable = false;  // entries from this CPU's best on are
  for (const Kernels& k : table) {
    reachable = reachable || std::strcmp(k.name, CpuIsa()) == 0;
    if (reachable && std::strcmp(k.name, name) == 0) {
      *chosen = k;
      return true;
    }
  }
  return false;
}

}  // namespace amos_native

// The two C functions `native_lib` reads and switches a kernel's ISA through:
// <prefix>_isa() names the build that runs ("avx512", "avx2" or "generic"), and
// <prefix>_use_isa(name) runs another (tests compare them), returning 0 where `name`
// is not compiled in or the CPU lacks it. `table` and `chosen` as Best and Use take.
#define AMOS_NATIVE_ISA_SWITCH(prefix, table, chosen)                                   \
  extern "C" const char* prefix##_isa() { return (chosen).name; }                      \
  extern "C" int prefix##_use_isa(const char* name) {                                   \
    return amos_native::Use(table, name, &(chosen));                                    \
  }

// A file's kernels once per ISA: BUILD (a macro) expanded with the arguments
// GENERIC in namespace generic, and on x86 with AVX2 in namespace avx2 (compiled for
// AVX2 + FMA) and with AVX512 in namespace avx512 (AVX-512 F, BW and VL), what
// CpuIsa requires of each. Each namespace gets kName, its ISA's name, first; BUILD
// defines there an entry `kBuild` of the file's table, which AMOS_NATIVE_BUILDS
// lists, best first.
#define AMOS_NATIVE_BUILD_IN(ns, BUILD, ARGS)                                           \
  namespace ns {                                                                        \
  constexpr const char* kName = #ns;                                                    \
  BUILD ARGS                                                                            \
  }

#if defined(__x86_64__) && defined(__GNUC__)
#define AMOS_NATIVE_X86 1
#define AMOS_NATIVE_PER_ISA(BUILD, GENERIC, AVX2, AVX512)                               \
  AMOS_NATIVE_BUILD_IN(generic, BUILD, GENERIC)                                         \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")                       \
  AMOS_NATIVE_BUILD_IN(avx2, BUILD, AVX2)                                               \
  _Pragma("GCC pop_options")                                                            \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl\")")      \
  AMOS_NATIVE_BUILD_IN(avx512, BUILD, AVX512)                                           \
  _Pragma("GCC pop_options")
#define AMOS_NATIVE_BUILDS {avx512::kBuild, avx2::kBuild, generic::kBuild}
#else
#define AMOS_NATIVE_X86 0
#define AMOS_NATIVE_PER_ISA(BUILD, GENERIC, AVX2, AVX512)                               \
  AMOS_NATIVE_BUILD_IN(generic, BUILD, GENERIC)
#define AMOS_NATIVE_BUILDS {generic::kBuild}
#endif

#endif  // AMOS_JAX_NATIVE_ISA_H_
