// CUDA part of kdfast.build_info(): kdfast::fill_cuda_build_info, called by build_info() in
// csrc/cpu/dispatch.cpp when the build has CUDA kernels (KDFAST_WITH_CUDA). It reports the
// CUDA runtime version the kernels were compiled against (CUDART_VERSION, e.g. "12.4") and
// the architectures they were compiled for (KDFAST_CUDA_ARCH_LIST, the CMake list given as
// CMAKE_CUDA_ARCHITECTURES, e.g. "80;90"). Host code only; touches no device.
#include <cuda_runtime_api.h>

#include <string>

#include "kdfast/kdfast.h"

#ifndef KDFAST_CUDA_ARCH_LIST
#define KDFAST_CUDA_ARCH_LIST ""
#endif

namespace kdfast {

void fill_cuda_build_info(BuildInfo& info) {
  info.cuda = true;
  info.cuda_version = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  info.cuda_architectures.clear();
  const std::string list = KDFAST_CUDA_ARCH_LIST;
  std::string item;
  for (const char c : list + ";") {
    if (c == ';' || c == ',' || c == ' ') {
      if (!item.empty()) info.cuda_architectures.push_back(item);
      item.clear();
    } else {
      item.push_back(c);
    }
  }
}

}  // namespace kdfast
