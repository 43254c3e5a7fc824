# ctest driver: install vqkit from BUILD_DIR into a fresh prefix, then, as a
# user would:
#  1. the core alone: configure (nlohmann-json and MPI hidden from CMake, so
#     the core cannot need them), build and run the consumer project (plain
#     Release flags, no -march), and compare its search digest with that of
#     the same program built with vqkit's own flags (NATIVE, -march=native):
#     run-time kernel dispatch must give the same results bit for bit;
#  2. the same program through pkg-config (vqkit.pc), same digest;
#  3. every installed component (io always; mpi and cuda when this build has
#     them; cuda only with CUDA_COMPILER): build, and run the io program;
#  4. COMPONENTS io with nlohmann-json hidden must fail, saying what is missing.
foreach(var BUILD_DIR SOURCE_DIR WORK_DIR NATIVE CXX)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run.cmake needs -D${var}=...")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
  set(last_output "${out}" PARENT_SCOPE)
endfunction()
function(digest_of out_var)
  run(${ARGN})
  string(REGEX MATCH "search digest [0-9a-f]+" d "${last_output}")
  set(${out_var} "${d}" PARENT_SCOPE)
endfunction()

run(${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${prefix}")
digest_of(native_digest "${NATIVE}")

# 1. The core alone.
run(${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${WORK_DIR}/core" -DCMAKE_BUILD_TYPE=Release
    "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON
    -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON)
run(${CMAKE_COMMAND} --build "${WORK_DIR}/core")
digest_of(plain_digest "${WORK_DIR}/core/consumer")
if(native_digest STREQUAL "" OR NOT plain_digest STREQUAL native_digest)
  message(FATAL_ERROR "plain -O3 consumer: '${plain_digest}', -march=native build: '${native_digest}'")
endif()

# 2. pkg-config.
find_program(PKG_CONFIG pkg-config)
if(PKG_CONFIG)
  set(ENV{PKG_CONFIG_PATH} "${prefix}/share/pkgconfig")
  run(${PKG_CONFIG} --cflags vqkit)
  string(STRIP "${last_output}" cflags)
  separate_arguments(cflags UNIX_COMMAND "${cflags}")
  run(${CXX} ${cflags} -O2 -fopenmp "${SOURCE_DIR}/main.cpp" -o "${WORK_DIR}/consumer_pc")
  digest_of(pc_digest "${WORK_DIR}/consumer_pc")
  if(NOT pc_digest STREQUAL native_digest)
    message(FATAL_ERROR "pkg-config consumer: '${pc_digest}', -march=native build: '${native_digest}'")
  endif()
else()
  message(STATUS "pkg-config not found: the vqkit.pc check is skipped")
endif()

# 3. The components.
set(components io)
file(GLOB_RECURSE mpi_targets "${prefix}/vqkitMpiTargets.cmake")
file(GLOB_RECURSE cuda_targets "${prefix}/vqkitCudaTargets.cmake")
if(mpi_targets)
  list(APPEND components mpi)
endif()
set(cuda_args)
if(cuda_targets AND CUDA_COMPILER)
  list(APPEND components cuda)
  set(cuda_args "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}" -DCMAKE_CUDA_ARCHITECTURES=90)
endif()
message(STATUS "components: ${components}")
string(REPLACE ";" "," components_arg "${components}")  # run() would split a list
run(${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${WORK_DIR}/components" -DCMAKE_BUILD_TYPE=Release
    "-DCMAKE_PREFIX_PATH=${prefix}" "-DVQKIT_CONSUMER_COMPONENTS=${components_arg}" ${cuda_args})
run(${CMAKE_COMMAND} --build "${WORK_DIR}/components")
run("${WORK_DIR}/components/consumer_io")
foreach(c IN LISTS components)
  if(NOT c STREQUAL "io" AND NOT EXISTS "${WORK_DIR}/components/consumer_${c}")
    message(FATAL_ERROR "component ${c}: consumer_${c} was not built")
  endif()
endforeach()

# 4. A missing dependency of a component is named.
execute_process(COMMAND ${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${WORK_DIR}/no_json"
                "-DCMAKE_PREFIX_PATH=${prefix}" -DVQKIT_CONSUMER_COMPONENTS=io
                -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT "${out}${err}" MATCHES "component io needs nlohmann-json")
  message(FATAL_ERROR "COMPONENTS io without nlohmann-json: exit ${rc}\n${out}\n${err}")
endif()
