// Whether a build's CUDA kernels run on a device: parsed from the build's architecture list
// (FUSEDLOSS_CUDA_ARCHS, as "8.0;9.0+PTX"). Host-only, no torch and no CUDA headers, so that
// tests/test_cuda_archs.py compiles it with the host compiler alone.
#pragma once

#include <cstdlib>
#include <string>

namespace fusedloss {

// A cubin (sm_XY) runs on devices of its own major version from its minor version up; PTX
// (compute_XY, "+PTX") is compiled by the driver for any device of X.Y or later.
inline bool cuda_archs_cover(const std::string& archs, int major, int minor) {
  const int device = major * 10 + minor;
  size_t start = 0;
  while (start < archs.size()) {
    size_t end = archs.find_first_of("; ", start);
    if (end == std::string::npos) end = archs.size();
    const std::string entry = archs.substr(start, end - start);
    start = end + 1;
    const size_t dot = entry.find('.');
    if (entry.empty() || dot == std::string::npos) continue;
    const int arch_major = std::atoi(entry.substr(0, dot).c_str());
    const int arch_minor = std::atoi(entry.substr(dot + 1).c_str());
    const bool ptx = entry.find("+PTX") != std::string::npos;
    if (arch_major == major && arch_minor <= minor) return true;
    if (ptx && arch_major * 10 + arch_minor <= device) return true;
  }
  return false;
}

}  // namespace fusedloss
