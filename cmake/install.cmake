# Install: the kvtrace command, libkvtrace.so, public headers, pkg-config file and a CMake
# package config, so an inference engine can find_package(kvtrace) or pkg-config --libs kvtrace.
set(KVT_PUBLIC_HEADERS common/kvt_common.h traces/kvt_trace.h)
foreach(h kernels/kvt_kernels.h replay/kvt_replay.h analysis/kvt_analysis.h
          capture/kvt_capture.h capture/kvt_llama2c.h traces/kvt_synth.h)
    if(EXISTS ${PROJECT_SOURCE_DIR}/${h})
        list(APPEND KVT_PUBLIC_HEADERS ${h})
    endif()
endforeach()
install(FILES ${KVT_PUBLIC_HEADERS} DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/kvtrace)
install(TARGETS kvtrace EXPORT kvtraceTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(TARGETS kvtrace_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(EXPORT kvtraceTargets NAMESPACE kvtrace::
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvtrace)

include(CMakePackageConfigHelpers)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/kvtraceConfig.cmake.in
    ${PROJECT_BINARY_DIR}/kvtraceConfig.cmake
    INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvtrace)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/kvtraceConfigVersion.cmake
    VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/kvtraceConfig.cmake
              ${PROJECT_BINARY_DIR}/kvtraceConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvtrace)

configure_file(${PROJECT_SOURCE_DIR}/cmake/kvtrace.pc.in ${PROJECT_BINARY_DIR}/kvtrace.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/kvtrace.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
