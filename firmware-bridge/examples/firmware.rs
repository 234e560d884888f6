//! Example firmware: the main loop of a sensor that talks to the gateway over a serial
//! line. All the protocol logic is [`firmware_bridge::device::Device`]; what is left here
//! is the hardware, behind [`Board`], and the loop that polls it.
//!
//! For a Cortex-M4F, without std or an allocator:
//!
//! ```text
//! cargo build -p firmware-bridge --example firmware --no-default-features --target thumbv7em-none-eabihf
//! ```
//!
//! On the host the same code builds with std and `cargo run -p firmware-bridge --example
//! firmware` runs the loop for a simulated minute and prints the counters.
//!
//! The board here is fake (a counter for a clock, a sawtooth for a sensor, a UART that
//! swallows what it is given and never receives anything), and `_start` stands in for a
//! real entry point: in real firmware take `cortex_m_rt::entry` (or embassy's executor),
//! a HAL's UART and timer, and keep the loop as it is.

// On a bare-metal target there is no std and no `main`; on the host the example is an
// ordinary program, so `cargo test`/`clippy --all-targets` build it like any other.
#![cfg_attr(target_os = "none", no_std, no_main)]

use firmware_bridge::device::{Board, Device, Identity, Sample, Settings};
use firmware_bridge::{Capabilities, Channel};
use heapless::{String, Vec};

/// Readings kept until the gateway acknowledges them: about 12 KiB of RAM.
const UNACKED: usize = 64;

/// Stand-in for the hardware.
struct FakeBoard {
    /// Real firmware: a SysTick or RTC counter, extended to 64 bits.
    now_ms: u64,
    /// Real firmware: the ADC.
    adc: u16,
    /// Real firmware: the UART's transmitter (blocking, or a DMA buffer).
    sent_bytes: usize,
}

impl FakeBoard {
    const fn new() -> Self {
        FakeBoard {
            now_ms: 0,
            adc: 0,
            sent_bytes: 0,
        }
    }

    /// Real firmware: sleep until the next timer tick or UART interrupt (`wfi`).
    fn sleep_ms(&mut self, ms: u64) {
        self.now_ms += ms;
    }
}

impl Board for FakeBoard {
    fn uptime_ms(&self) -> u64 {
        self.now_ms
    }

    fn sample(&mut self) -> Option<Sample> {
        self.adc = (self.adc + 37) % 4096;
        let mut channels = Vec::new();
        // Channel 1: a temperature from a 12-bit ADC, -40..85 degC.
        let celsius = -40.0 + f32::from(self.adc) * 125.0 / 4095.0;
        channels
            .push(Channel {
                id: 1,
                value: celsius,
            })
            .ok()?;
        Some(Sample {
            channels,
            fix: None,
        })
    }

    fn write(&mut self, bytes: &[u8]) {
        self.sent_bytes += bytes.len();
    }

    /// Real firmware: drain the ring buffer the UART receive interrupt fills.
    fn read(&mut self, _buf: &mut [u8]) -> usize {
        0
    }
}

/// Real firmware: the device id from the chip's unique id or provisioning data in flash,
/// and `boot` from a counter in flash incremented at every start.
fn identity() -> Identity {
    Identity {
        device_id: String::try_from("pump-7").unwrap_or_default(),
        firmware: String::try_from(env!("CARGO_PKG_VERSION")).unwrap_or_default(),
        capabilities: Capabilities(0),
        boot: 1,
        first_seq: 0,
    }
}

/// The whole firmware: poll, sleep, repeat.
fn run(board: &mut FakeBoard, device: &mut Device<UNACKED>, ms: Option<u64>) {
    while ms.is_none_or(|end| board.now_ms < end) {
        device.poll(board);
        board.sleep_ms(1);
    }
}

#[cfg(target_os = "none")]
mod bare_metal {
    use super::*;

    /// Real firmware: log the panic somewhere that survives a reset, then reset
    /// (`cortex_m::peripheral::SCB::sys_reset`). The device announces the new boot.
    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        loop {
            core::hint::spin_loop();
        }
    }

    /// The entry point the linker looks for. Real firmware uses `cortex_m_rt::entry`,
    /// which also lays out the vector table and initialises RAM.
    #[allow(unsafe_code)] // `no_mangle` is the lint's concern: the symbol name is exported
    #[no_mangle]
    extern "C" fn _start() -> ! {
        let mut board = FakeBoard::new();
        let mut device = Device::<UNACKED>::new(identity(), Settings::default());
        run(&mut board, &mut device, None);
        loop {
            core::hint::spin_loop();
        }
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    let mut board = FakeBoard::new();
    let mut device = Device::<UNACKED>::new(identity(), Settings::default());
    run(&mut board, &mut device, Some(60_000));
    let s = device.stats();
    println!(
        "one simulated minute: {} readings, {} bytes sent, {} unacked, {} dropped \
         (this fake board has no gateway, so nothing is acked)",
        s.sampled,
        board.sent_bytes,
        device.unacked(),
        s.dropped
    );
}
