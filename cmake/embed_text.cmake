# embed_text.cmake - turn a text file into a C source that defines it as a NULL-terminated array
# of string literals, one per line (no '\n' in them), so a library can carry the file without
# reading it at run time. Used by report/ for page.js, the script of index.html. Run at build
# time by add_custom_command:
#
#   cmake -DINPUT=page.js -DOUTPUT=page_js.c -DSYMBOL=kvt_report_page_js
#         [-DINCLUDE=report_internal.h] [-DSTRIP_HEADER=ON] [-DINLINE_SCRIPT=ON]
#         -P embed_text.cmake
#
# INCLUDE: a header declaring SYMBOL (extern const char *const SYMBOL[];), included so the
#   compiler checks the definition against it.
# STRIP_HEADER: a block comment opening the file, and the blank lines after it, are the
#   source's own documentation and are left out of the array.
# INLINE_SCRIPT: the text goes inside an HTML <script> element, so fail if it holds "</script"
#   (any case: it would end the element) or "<!--" (it changes how the HTML parser reads the
#   rest of the element).
#
# Escaping: '\' and '"' are backslash-escaped, the second '?' of "??" becomes "\?" (no
# trigraphs in -std=c11), and every byte outside printable ASCII (UTF-8 included) becomes a
# three-digit octal escape, which, unlike \x, cannot swallow the characters after it. CRLF line
# ends are read as LF. The output is written to a temporary file and renamed, so a failed run
# leaves no partial file.

foreach(var INPUT OUTPUT SYMBOL)
    if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
        message(FATAL_ERROR "embed_text.cmake: -D${var}=... is required")
    endif()
endforeach()
if(NOT SYMBOL MATCHES "^[A-Za-z_][A-Za-z0-9_]*$")
    message(FATAL_ERROR "embed_text.cmake: SYMBOL '${SYMBOL}' is not a C identifier")
endif()
if(NOT EXISTS "${INPUT}")
    message(FATAL_ERROR "embed_text.cmake: cannot read ${INPUT}")
endif()

# Lower-case hex, two digits per byte: safe for any content (no ';', '[' or NUL trouble).
file(READ "${INPUT}" hex HEX)

if(INLINE_SCRIPT)
    file(READ "${INPUT}" text)
    string(TOLOWER "${text}" lower)
    foreach(bad "</script" "<!--")
        string(FIND "${lower}" "${bad}" pos)
        if(pos GREATER_EQUAL 0)
            string(SUBSTRING "${lower}" 0 ${pos} before)
            string(REGEX REPLACE "[^\n]" "" newlines "${before}")
            string(LENGTH "${newlines}" line)
            math(EXPR line "${line} + 1")
            message(FATAL_ERROR
                "${INPUT}:${line}: contains \"${bad}\" (the check ignores case), which would "
                "break the HTML <script> element this file is inlined into. Split the string "
                "('<' + '/script', '<' + '!--') or escape it ('<\\/script', '<\\!--').")
        endif()
    endforeach()
endif()

# _esc_<hh>: the C literal text of byte 0x<hh>.
foreach(code RANGE 255)
    math(EXPR hi "${code} / 16")
    math(EXPR lo "${code} % 16")
    string(SUBSTRING "0123456789abcdef" ${hi} 1 h1)
    string(SUBSTRING "0123456789abcdef" ${lo} 1 h2)
    if(code GREATER_EQUAL 32 AND code LESS 127)
        string(ASCII ${code} ch)
        set(_esc_${h1}${h2} "${ch}")
    else()
        math(EXPR o1 "${code} / 64")
        math(EXPR o2 "(${code} / 8) % 8")
        math(EXPR o3 "${code} % 8")
        set(_esc_${h1}${h2} "\\${o1}${o2}${o3}")
    endif()
endforeach()
set(_esc_5c "\\\\")
set(_esc_22 "\\\"")

string(REGEX MATCHALL ".." bytes "${hex}")
# state: header (inside the opening comment), blank (skipping blank lines after it), body
set(state body)
if(STRIP_HEADER AND hex MATCHES "^2f2a")
    set(state header)
endif()
set(out "")
set(line "")
set(prev "")
set(idx 0)
set(closed OFF)
foreach(b IN LISTS bytes)
    if(b STREQUAL "0a")
        if(state STREQUAL "header")
            if(closed)
                set(state blank)
            endif()
        elseif(state STREQUAL "blank" AND line MATCHES "^[ \t]*$")
            # still skipping
        else()
            set(state body)
            string(APPEND out "    \"${line}\",\n")
        endif()
        set(line "")
    elseif(b STREQUAL "0d")
        # CRLF read as LF
    elseif(state STREQUAL "header")
        if(prev STREQUAL "2a" AND b STREQUAL "2f" AND idx GREATER_EQUAL 3)
            set(closed ON)
        endif()
    elseif(b STREQUAL "3f" AND prev STREQUAL "3f")
        string(APPEND line "\\?")
    else()
        string(APPEND line "${_esc_${b}}")
    endif()
    set(prev "${b}")
    math(EXPR idx "${idx} + 1")
endforeach()
if(state STREQUAL "header")
    message(FATAL_ERROR "${INPUT}: the header comment is not closed")
endif()
if(NOT line STREQUAL "" AND NOT (state STREQUAL "blank" AND line MATCHES "^[ \t]*$"))
    string(APPEND out "    \"${line}\",\n") # last line without '\n'
endif()

get_filename_component(in_name "${INPUT}" NAME)
get_filename_component(out_name "${OUTPUT}" NAME)
set(include_line "")
if(DEFINED INCLUDE AND NOT INCLUDE STREQUAL "")
    set(include_line "\n#include \"${INCLUDE}\"\n")
endif()
file(WRITE "${OUTPUT}.tmp"
     "/* ${out_name} - generated from ${in_name} by embed_text.cmake at build time; do not edit:\n"
     " * edit ${in_name}. ${SYMBOL}: its lines, NULL-terminated.\n"
     " */\n"
     "#include <stddef.h>\n"
     "${include_line}\n"
     "const char *const ${SYMBOL}[] = {\n"
     "${out}"
     "    NULL,\n"
     "};\n")
file(RENAME "${OUTPUT}.tmp" "${OUTPUT}")
