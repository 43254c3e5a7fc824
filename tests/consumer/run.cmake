# ctest driver: install vqkit from BUILD_DIR into a fresh prefix, then
# configure, build and run the consumer project against it (plain Release
# flags, no -march), and compare its search digest with that of the same
# program built with vqkit's own flags (NATIVE, -march=native): run-time
# kernel dispatch must give the same results bit for bit.
foreach(var BUILD_DIR SOURCE_DIR WORK_DIR NATIVE)
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
run(${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${prefix}")
run(${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${WORK_DIR}/build" -DCMAKE_BUILD_TYPE=Release
    "-DCMAKE_PREFIX_PATH=${prefix}")
run(${CMAKE_COMMAND} --build "${WORK_DIR}/build")
run("${WORK_DIR}/build/consumer")
string(REGEX MATCH "search digest [0-9a-f]+" plain_digest "${last_output}")
run("${NATIVE}")
string(REGEX MATCH "search digest [0-9a-f]+" native_digest "${last_output}")
if(plain_digest STREQUAL "" OR NOT plain_digest STREQUAL native_digest)
  message(FATAL_ERROR "plain -O3 consumer: '${plain_digest}', -march=native build: '${native_digest}'")
endif()
