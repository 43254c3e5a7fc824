# ctest: examples/vq_encode end to end on the numpy fixtures (tests/fixtures/io,
# gen_io.py): its indices must be byte-identical to numpy's float64 argmin
# saved by np.save (.npy) and written as .ivecs, for a float32 .npy codebook
# and for a BF16 1 x K x D tensor of a PyTorch-style state dict; bad command
# lines exit 2 and bad files 1, each with a message.
# Arguments: -DVQ_ENCODE=<program> -DFIXTURES=<dir> -DWORK_DIR=<dir>
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(expect_run want_rc want_text)
  execute_process(COMMAND "${VQ_ENCODE}" ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL want_rc)
    message(FATAL_ERROR "vq_encode ${ARGN}: exit ${rc}, expected ${want_rc}\nstdout: ${out}\nstderr: ${err}")
  endif()
  string(FIND "${out}${err}" "${want_text}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "vq_encode ${ARGN}: output lacks '${want_text}'\nstdout: ${out}\nstderr: ${err}")
  endif()
endfunction()

function(expect_same got want)
  file(SHA256 "${got}" a)
  file(SHA256 "${want}" b)
  if(NOT a STREQUAL b)
    message(FATAL_ERROR "${got} differs from ${want}")
  endif()
endfunction()

set(F "${FIXTURES}")
foreach(out nearest.npy nearest.ivecs)
  expect_run(0 "16 of 16 codes used" --codebook "${F}/codebook.npy" --input "${F}/vectors.npy"
             --output "${WORK_DIR}/${out}" --threads 2 --batch 64)
  expect_same("${WORK_DIR}/${out}" "${F}/${out}")
endforeach()
expect_run(0 "wrote" --codebook "${F}/state_dict.safetensors" --tensor vq._codebook.embed
           --input "${F}/vectors.npy" --output "${WORK_DIR}/bf16.npy")
expect_same("${WORK_DIR}/bf16.npy" "${F}/nearest_bf16.npy")

expect_run(0 "usage: vq_encode" --help)
expect_run(2 "--codebook FILE is required" --input "${F}/vectors.npy" --output "${WORK_DIR}/x.npy")
expect_run(2 "unknown option '--nope'" --nope 1)
expect_run(2 "--output: bad value" --codebook "${F}/codebook.npy" --input "${F}/vectors.npy" --output x.txt)
expect_run(1 "candidates: " --codebook "${F}/state_dict.safetensors" --input "${F}/vectors.npy"
           --output "${WORK_DIR}/x.npy")
expect_run(1 "have D=4, but the codebook" --codebook "${F}/codebook.npy" --input "${F}/f32_3x4.npy"
           --output "${WORK_DIR}/x.npy")
if(EXISTS "${WORK_DIR}/x.npy")
  message(FATAL_ERROR "a failed run wrote ${WORK_DIR}/x.npy")
endif()
