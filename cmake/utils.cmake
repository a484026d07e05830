# Ask the Python interpreter that builds us (the one with torch installed) for a value.
function(run_python OUT EXPR ERR_MSG)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "${EXPR}"
    OUTPUT_VARIABLE _out RESULT_VARIABLE _rc ERROR_VARIABLE _err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "${ERR_MSG}: ${_err}")
  endif()
  set(${OUT} "${_out}" PARENT_SCOPE)
endfunction()
