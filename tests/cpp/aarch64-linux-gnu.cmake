# Cross toolchain for the C++ core on aarch64 with Debian's g++-aarch64-linux-gnu:
#   cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=tests/cpp/aarch64-linux-gnu.cmake \
#         -DMIPSCAN_PYTHON=OFF -DMIPSCAN_CPP_TESTS=ON
# ctest then runs the tests under qemu-aarch64 (Debian's qemu-user), when it is installed.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
find_program(MIPSCAN_QEMU_AARCH64 NAMES qemu-aarch64 qemu-aarch64-static)
if(MIPSCAN_QEMU_AARCH64)
  # -L: where qemu finds the aarch64 loader and libraries (libc6-arm64-cross).
  set(CMAKE_CROSSCOMPILING_EMULATOR ${MIPSCAN_QEMU_AARCH64} -L /usr/aarch64-linux-gnu)
endif()
