# Sourced by the cross scripts: sets the compilers for one ARM target so every C part
# (librdkafka's own configure, and the cc-crate builds: SQLite, OpenSSL, zstd, ring,
# mimalloc) is built for the target, while build scripts keep the host compiler.
#
#   . cross/env.sh aarch64-unknown-linux-gnu

cross_target="${1:?usage: . cross/env.sh TARGET}"
case "$cross_target" in
    aarch64-unknown-linux-gnu) cross_prefix=aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) cross_prefix=arm-linux-gnueabihf ;;
    arm-unknown-linux-gnueabihf)
        # Debian's arm-linux-gnueabihf-gcc emits ARMv7 code; the ARMv6 Pi Zero / Pi 1
        # need an ARMv6 toolchain (cross's Docker image has one).
        cross_prefix=arm-linux-gnueabihf ;;
    *)
        echo "cross: unsupported target '$cross_target' (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf)" >&2
        return 1 ;;
esac
cross_var="$(echo "$cross_target" | tr 'a-z-' 'A-Z_')"
cross_lower="$(echo "$cross_target" | tr '-' '_')"
export "CC_${cross_lower}=${cross_prefix}-gcc" "CXX_${cross_lower}=${cross_prefix}-g++" "AR_${cross_lower}=${cross_prefix}-ar"
export "CARGO_TARGET_${cross_var}_LINKER=${cross_prefix}-gcc"
# librdkafka's mklove configure reads the plain variables; host builds are pinned back.
export CC="${cross_prefix}-gcc" CXX="${cross_prefix}-g++" AR="${cross_prefix}-ar" \
    LD="${cross_prefix}-ld" NM="${cross_prefix}-nm" RANLIB="${cross_prefix}-ranlib" \
    STRIP="${cross_prefix}-strip" OBJDUMP="${cross_prefix}-objdump"
export HOST_CC=gcc HOST_CXX=g++ HOST_AR=ar
# Size: every C part for the device at -Os, one section per function and datum so the
# linker drops what the gateway never calls (librdkafka's mklove build would otherwise use
# -O2 and keep whole objects: its consumer, admin and mock-cluster code). The cc-crate
# builds read the target-specific variable, librdkafka's configure the plain one.
export "CFLAGS_${cross_lower}=-Os -ffunction-sections -fdata-sections"
export CFLAGS="-Os -ffunction-sections -fdata-sections"
export HOST_CFLAGS="-O2"
# Tests and `cargo run` go through qemu-user with the cross sysroot's loader.
export "CARGO_TARGET_${cross_var}_RUNNER=qemu-${cross_prefix%%-*} -L /usr/${cross_prefix}"
case "$cross_prefix" in arm-*) export "CARGO_TARGET_${cross_var}_RUNNER=qemu-arm -L /usr/${cross_prefix}" ;; esac
