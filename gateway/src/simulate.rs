//! `gateway simulate serial`: a serial device on a pseudo-terminal, for tests, demos and
//! trying a config without hardware.
//!
//! It runs the real device logic of the `firmware-bridge` crate ([`Device`]: ring buffer
//! of unacknowledged readings, resend, `TimeSync`) behind a [`Board`] whose wire is the
//! master side of a pseudo-terminal, and keeps a symlink (`--link`) pointing at the slave
//! side, the way `/dev/serial/by-id/...` points at a USB adapter. The gateway opens the
//! link like any serial port. With `--framing json-lines` it writes made-up JSON lines, with
//! `--framing nmea --replay LOG` the sentences of a GPS receiver's log. Knobs: rate, byte
//! corruption, garbage between frames,
//! reboots (a new boot, `seq` from 0 or kept with `--persistent-seq`, unacknowledged
//! readings lost as on a real reboot, the new boot's `Hello` lost with `--lose-hello`)
//! and unplugs (the pty goes away and comes back as a new one behind the same link).
//!
//! At the end it prints a JSON report: per boot the readings taken and the highest one the
//! gateway acknowledged, so a test can check that every acknowledged reading reached Kafka.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use firmware_bridge::device::{Board, Device, Identity, Sample, Settings};
use firmware_bridge::{
    Capabilities, Channel, Decoder, DeviceMessage, Fix, FixQuality, GatewayMessage,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_serial::{SerialPort, SerialStream};

/// How the simulated device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SimFraming {
    /// The firmware-bridge protocol (acknowledged, resent).
    FirmwareBridge,
    /// One JSON object per line (nothing comes back).
    JsonLines,
    /// NMEA 0183 sentences replayed from a log (`--replay`), as a GPS receiver sends them.
    Nmea,
}

/// Options of `gateway simulate serial`.
#[derive(Debug, Clone, clap::Args)]
pub struct SerialSim {
    /// The symlink to keep pointing at the pseudo-terminal (configure it as the port).
    #[arg(long)]
    pub link: PathBuf,
    /// The device id.
    #[arg(long, default_value = "sim-1")]
    pub device: String,
    /// Readings per second.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Readings to take in all; then wait for the last acks and stop (0: until SIGTERM).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Framing.
    #[arg(long, value_enum, default_value_t = SimFraming::FirmwareBridge)]
    pub framing: SimFraming,
    /// Fraction of bytes sent to the gateway with one bit flipped (0.01 = 1%).
    #[arg(long, default_value_t = 0.0)]
    pub corrupt: f64,
    /// Chance per write of a burst of random bytes (garbage between frames) and of a frame
    /// cut short.
    #[arg(long, default_value_t = 0.0)]
    pub garbage: f64,
    /// Reboot after this many readings of a boot (0: never).
    #[arg(long, default_value_t = 0)]
    pub reboot_every: u64,
    /// Keep `seq` across reboots (capability `PERSISTENT_SEQ`): a new boot goes on from
    /// where the last one stopped instead of from 0.
    #[arg(long)]
    pub persistent_seq: bool,
    /// Lose the `Hello` that starts each boot after a reboot on the line, as a frame lost
    /// to noise would be; the device sends another when no ack comes.
    #[arg(long)]
    pub lose_hello: bool,
    /// Every this many readings, channel 2 reads NaN (a sensor fault) (0: never).
    #[arg(long, default_value_t = 0)]
    pub nan_every: u64,
    /// Every reading whose `seq` is a multiple of this is sent as a newer firmware might
    /// send it: with a `Timestamp` variant this version does not know, so it passes its
    /// CRC but does not decode (0: never).
    #[arg(long, default_value_t = 0)]
    pub newer_every: u32,
    /// Unplug every this many seconds (0: never).
    #[arg(long, default_value_t = 0.0)]
    pub unplug_every: f64,
    /// Seconds an unplug lasts.
    #[arg(long, default_value_t = 1.0)]
    pub unplug_for: f64,
    /// Seconds without an ack after which the device sends everything unacknowledged again.
    #[arg(long, default_value_t = 1.0)]
    pub resend_after: f64,
    /// Seconds to wait for the last acks once `count` readings are taken.
    #[arg(long, default_value_t = 30.0)]
    pub settle: f64,
    /// Random seed (corruption, values).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The lines to replay: an NMEA log, one sentence per line (`--framing nmea`, which
    /// needs it), or JSON lines (`--framing json-lines`, instead of made-up readings);
    /// `--rate` is in lines per second and `--count` (0: the whole file) caps the lines
    /// sent.
    #[arg(long)]
    pub replay: Option<PathBuf>,
    /// Seconds to wait, before the first line, for a reader to configure the port (0: send
    /// at once, as a receiver that streams whether anyone listens). A replay is finite, so
    /// a test replaying a log waits: lines sent before the gateway opens the port are lost.
    /// The wait ends when the port's baud rate leaves the simulator's marker (50 baud).
    #[arg(long, default_value_t = 0.0)]
    pub wait_reader: f64,
}

/// One boot's outcome.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BootReport {
    /// The boot id.
    pub boot: u32,
    /// The boot's first `seq` (0, or where the last boot stopped with `--persistent-seq`).
    pub first_seq: u32,
    /// Readings taken (`seq` `first_seq` up to this, exclusive).
    pub sampled: u32,
    /// The highest `seq` the gateway acknowledged, if any.
    pub acked_up_to: Option<u32>,
    /// Readings still unacknowledged when the boot ended.
    pub unacked: u32,
}

/// What happened, printed as JSON at the end.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SimReport {
    /// The device id.
    pub device: String,
    /// Every boot, in order.
    pub boots: Vec<BootReport>,
    /// Lines written (`json-lines`, `nmea`).
    pub lines: u64,
    /// Lines not written because nobody read the port for 200 ms (lost, as on a real line).
    pub unwritten: u64,
    /// Readings sent again.
    pub resent: u64,
    /// Readings the device's buffer dropped before they were acknowledged.
    pub dropped: u64,
    /// Bytes with a flipped bit.
    pub corrupted_bytes: u64,
    /// Bursts of garbage and frames cut short.
    pub garbage: u64,
    /// Unplugs.
    pub unplugs: u64,
    /// `Hello`s lost on purpose (`--lose-hello`).
    pub lost_hellos: u64,
}

/// Ring buffer size of the simulated device (readings kept until acknowledged): about
/// 190 bytes each, so the device lives in a `Box`.
const RING: usize = 2048;

struct SimBoard {
    start: Instant,
    rx: Vec<u8>,
    tx: Vec<u8>,
    link: bool,
    rng: StdRng,
    taken: u64,
    limit: u64,
    /// `--nan-every`.
    nan_every: u64,
    /// `--newer-every`.
    newer_every: u32,
}

impl Board for SimBoard {
    fn uptime_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn sample(&mut self) -> Option<Sample> {
        if self.limit > 0 && self.taken >= self.limit {
            return None;
        }
        self.taken += 1;
        let t = self.taken as f32;
        let mut channels = heapless::Vec::new();
        let _ = channels.push(Channel {
            id: 1,
            value: 20.0 + (t / 50.0).sin() * 5.0,
        });
        let faulty = self.nan_every > 0 && self.taken % self.nan_every == 0;
        let _ = channels.push(Channel {
            id: 2,
            value: if faulty {
                f32::NAN
            } else {
                self.rng.random_range(30.0..60.0)
            },
        });
        Some(Sample {
            channels,
            fix: Some(Fix {
                lat_e7: 525_200_000 + (self.taken as i32 % 100_000),
                lon_e7: 134_050_000,
                alt_cm: Some(3_400),
                accuracy_cm: Some(250),
                hdop_centi: Some(90),
                quality: FixQuality::Fix3d,
            }),
        })
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.newer_every == 0 {
            self.tx.extend_from_slice(bytes);
            return;
        }
        for frame in bytes.split_inclusive(|&b| b == 0) {
            match newer(frame, self.newer_every) {
                Some(changed) => self.tx.extend_from_slice(&changed),
                None => self.tx.extend_from_slice(frame),
            }
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.rx.len());
        buf[..n].copy_from_slice(&self.rx[..n]);
        self.rx.drain(..n);
        n
    }

    fn link_up(&self) -> bool {
        self.link
    }
}

/// Removes the link when dropped.
struct LinkGuard(PathBuf);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A new pseudo-terminal behind `link`: the master (ours) and the slave (kept open so
/// the pty lives until the gateway opens it).
fn plug(link: &Path) -> anyhow::Result<(SerialStream, SerialStream)> {
    let (master, mut slave) = SerialStream::pair().context("cannot create a pseudo-terminal")?;
    // The marker `--wait-reader` watches for, set before the link exists so that a reader
    // that opens the port at once is seen.
    {
        use tokio_serial::SerialPort;
        slave
            .set_baud_rate(MARKER_BAUD)
            .context("cannot mark the pseudo-terminal's baud rate")?;
    }
    let name = slave.name().context("the pseudo-terminal has no name")?;
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp)
        .with_context(|| format!("cannot create the link {}", tmp.display()))?;
    std::fs::rename(&tmp, link)
        .with_context(|| format!("cannot move the link to {}", link.display()))?;
    Ok((master, slave))
}

/// The baud rate the simulator leaves on its pseudo-terminal while it waits for a reader.
const MARKER_BAUD: u32 = 50;

/// Waits until a reader configures the pseudo-terminal: [`plug`] marks it with
/// [`MARKER_BAUD`] and the reader's open sets its own rate (the two ends share one termios).
async fn wait_reader(slave: &mut SerialStream, within: Duration) -> anyhow::Result<()> {
    use tokio_serial::SerialPort;
    let deadline = Instant::now() + within;
    while slave.baud_rate().context("cannot read the baud rate")? == MARKER_BAUD {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no reader opened the port within {within:?} (--wait-reader)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn new_device(sim: &SerialSim, boot: u32, first_seq: u32) -> anyhow::Result<Box<Device<RING>>> {
    let capabilities = if sim.persistent_seq {
        Capabilities::GNSS | Capabilities::PERSISTENT_SEQ
    } else {
        Capabilities::GNSS
    };
    let identity = Identity {
        device_id: sim
            .device
            .as_str()
            .try_into()
            .map_err(|()| anyhow::anyhow!("--device: at most 32 bytes"))?,
        firmware: "sim-1.0"
            .try_into()
            .map_err(|()| anyhow::anyhow!("firmware"))?,
        capabilities: Capabilities(capabilities),
        boot,
        first_seq,
    };
    let interval = (1000.0 / sim.rate.max(0.001)).round().max(1.0) as u32;
    Ok(Box::new(Device::new(
        identity,
        Settings {
            sample_interval_ms: interval,
            heartbeat_interval_ms: 5_000,
            resend_after_ms: (sim.resend_after * 1000.0) as u32,
            burst: 32,
        },
    )))
}

/// Runs the simulated device until `count` readings are taken and acknowledged (or
/// `settle` ran out), or until `stop` resolves.
pub async fn serial(
    sim: SerialSim,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<SimReport> {
    anyhow::ensure!(
        (0.01..=100_000.0).contains(&sim.rate),
        "--rate must be between 0.01 and 100000 per second"
    );
    for (name, v) in [
        ("--settle", sim.settle),
        ("--unplug-every", sim.unplug_every),
        ("--unplug-for", sim.unplug_for),
        ("--resend-after", sim.resend_after),
        ("--wait-reader", sim.wait_reader),
    ] {
        anyhow::ensure!(
            (0.0..=86_400.0).contains(&v),
            "{name} must be between 0 and 86400 seconds"
        );
    }
    anyhow::ensure!(
        (0.0..=1.0).contains(&sim.corrupt) && (0.0..=1.0).contains(&sim.garbage),
        "--corrupt and --garbage are fractions between 0 and 1"
    );
    let mut rng = StdRng::seed_from_u64(sim.seed);
    let mut report = SimReport {
        device: sim.device.clone(),
        ..SimReport::default()
    };
    let mut port = Some(plug(&sim.link)?);
    // The link goes before the pty does (locals drop in reverse order), on unplug too: a
    // link left pointing at a closed pseudo-terminal would lead a gateway to whatever pty
    // reuses its number next.
    let _link = LinkGuard(sim.link.clone());
    eprintln!(
        "simulate: {} -> {}",
        sim.link.display(),
        port.as_ref()
            .and_then(|(_, s)| s.name())
            .unwrap_or_default()
    );
    if sim.framing != SimFraming::FirmwareBridge {
        return lines(sim, port, rng, report, stop).await;
    }
    let mut boot: u32 = rng.random_range(1..1_000_000);
    let mut first_seq = 0;
    let mut device = new_device(&sim, boot, first_seq)?;
    // Set at a reboot with --lose-hello: the next Hello written is dropped.
    let mut lose_hello = false;
    let mut acked: Option<u32> = None;
    let mut board = SimBoard {
        start: Instant::now(),
        rx: Vec::new(),
        tx: Vec::new(),
        link: true,
        rng: StdRng::seed_from_u64(sim.seed.wrapping_add(1)),
        taken: 0,
        limit: sim.count,
        nan_every: sim.nan_every,
        newer_every: sim.newer_every,
    };
    let mut sniff = Decoder::new();
    let mut buf = [0u8; 4096];
    let unplug_every = Duration::from_secs_f64(sim.unplug_every.max(0.0));
    let mut next_unplug = (sim.unplug_every > 0.0).then(|| Instant::now() + unplug_every);
    let mut replug_at: Option<Instant> = None;
    let mut boot_first_taken: u64 = 0;
    let mut done_at: Option<Instant> = None;
    tokio::pin!(stop);
    loop {
        // What the gateway sent: to the device, and to us (to learn what was acked).
        if let Some((master, _)) = port.as_mut() {
            tokio::select! {
                _ = &mut stop => break,
                r = master.read(&mut buf) => if let Ok(n) = r {
                    board.rx.extend_from_slice(&buf[..n]);
                    sniff.feed::<GatewayMessage>(&buf[..n], |m| {
                        if let Ok(GatewayMessage::Ack { boot: b, up_to }) = m {
                            if b == boot && acked.is_none_or(|a| up_to > a) {
                                acked = Some(up_to);
                            }
                        }
                    });
                },
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        } else {
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        }
        board.link = port.is_some();
        device.poll(&mut board);
        let mut out = std::mem::take(&mut board.tx);
        if let Some((master, _)) = port.as_mut() {
            if lose_hello && drop_hello(&mut out) {
                lose_hello = false;
                report.lost_hellos += 1;
            }
            if !out.is_empty() {
                damage(&sim, &mut rng, &mut out, &mut report);
                // Nobody reading for a while: the bytes are lost, as on a real line.
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), master.write_all(&out)).await;
            }
        }
        // Reboot: a new boot, seq from 0; what was not acknowledged is gone with the RAM.
        let taken_this_boot = board.taken - boot_first_taken;
        if sim.reboot_every > 0 && taken_this_boot >= sim.reboot_every {
            finish_boot(&mut report, &device, acked, first_seq);
            boot = boot.wrapping_add(1);
            if sim.persistent_seq {
                first_seq = device.next_seq();
            }
            device = new_device(&sim, boot, first_seq)?;
            lose_hello = sim.lose_hello;
            acked = None;
            boot_first_taken = board.taken;
            sniff.reset();
        }
        let now = Instant::now();
        if next_unplug.is_some_and(|t| now >= t) && port.is_some() {
            let _ = std::fs::remove_file(&sim.link);
            port = None;
            report.unplugs += 1;
            replug_at = Some(now + Duration::from_secs_f64(sim.unplug_for.max(0.0)));
            next_unplug = Some(now + unplug_every);
        }
        if replug_at.is_some_and(|t| now >= t) {
            port = Some(plug(&sim.link)?);
            replug_at = None;
            sniff.reset();
        }
        if sim.count > 0 && board.taken >= sim.count {
            if device.unacked() == 0 && port.is_some() {
                break;
            }
            let until = *done_at.get_or_insert(now + Duration::from_secs_f64(sim.settle));
            if now >= until {
                break;
            }
        }
    }
    finish_boot(&mut report, &device, acked, first_seq);
    Ok(report)
}

fn finish_boot(report: &mut SimReport, device: &Device<RING>, acked: Option<u32>, first_seq: u32) {
    let s = device.stats();
    report.resent += u64::from(s.resent);
    report.dropped += u64::from(s.dropped);
    report.boots.push(BootReport {
        boot: device.boot(),
        first_seq,
        sampled: device.next_seq(),
        acked_up_to: acked,
        unacked: u32::try_from(device.unacked()).unwrap_or(u32::MAX),
    });
}

/// `frame` (a whole frame, delimiter included) as a newer firmware would send it, if it
/// is a reading whose `seq` is a multiple of `every`: its `Timestamp` variant index
/// replaced by one this version does not know, framed again with a good CRC.
fn newer(frame: &[u8], every: u32) -> Option<Vec<u8>> {
    let mut copy = frame.strip_suffix(&[0])?.to_vec();
    let mut body = firmware_bridge::check_frame(&mut copy).ok()?.to_vec();
    let seq = firmware_bridge::reading_seq(&body)?;
    if seq % every != 0 {
        return None;
    }
    // The type (one byte), then `seq` as a varint, then the timestamp's variant index.
    let seq_len = body[1..].iter().position(|b| b & 0x80 == 0)? + 1;
    *body.get_mut(1 + seq_len)? = 2;
    let mut out = [0u8; firmware_bridge::MAX_FRAME];
    let n = firmware_bridge::encode_raw(&body, &mut out).ok()?;
    Some(out[..n].to_vec())
}

/// Takes the first `Hello` frame out of `out`, if there is one; true if it did.
fn drop_hello(out: &mut Vec<u8>) -> bool {
    let mut start = 0;
    while let Some(len) = out[start..].iter().position(|&b| b == 0) {
        let end = start + len + 1;
        let mut frame = out[start..end - 1].to_vec();
        if let Ok(DeviceMessage::Hello(_)) = firmware_bridge::decode_frame(&mut frame) {
            out.drain(start..end);
            return true;
        }
        start = end;
    }
    false
}

/// Flips bits, inserts garbage, cuts frames short, as `--corrupt` and `--garbage` ask.
fn damage(sim: &SerialSim, rng: &mut StdRng, out: &mut Vec<u8>, report: &mut SimReport) {
    if sim.corrupt > 0.0 {
        for b in out.iter_mut() {
            if rng.random_bool(sim.corrupt.min(1.0)) {
                *b ^= 1 << rng.random_range(0..8);
                report.corrupted_bytes += 1;
            }
        }
    }
    if sim.garbage > 0.0 && rng.random_bool(sim.garbage.min(1.0)) {
        report.garbage += 1;
        if rng.random_bool(0.5) {
            let junk: Vec<u8> = (0..rng.random_range(1..40)).map(|_| rng.random()).collect();
            out.splice(0..0, junk);
        } else if out.len() > 2 {
            let cut = rng.random_range(1..out.len());
            out.truncate(cut);
        }
    }
}

/// `json-lines` (made up) or `nmea` (replayed from `--replay`), one line at a time.
async fn lines(
    sim: SerialSim,
    mut port: Option<(SerialStream, SerialStream)>,
    mut rng: StdRng,
    mut report: SimReport,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<SimReport> {
    let replay: Vec<String> = match (&sim.framing, &sim.replay) {
        (_, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .lines()
            .map(|l| l.trim_end().to_string())
            .filter(|l| !l.is_empty())
            .collect(),
        (SimFraming::Nmea, None) => anyhow::bail!("--framing nmea needs --replay FILE"),
        _ => Vec::new(),
    };
    let total = match (replay.is_empty(), sim.count) {
        (false, 0) => replay.len() as u64,
        (false, n) => n.min(replay.len() as u64),
        (true, n) => n,
    };
    tokio::pin!(stop);
    if let Some((_, slave)) = port.as_mut().filter(|_| sim.wait_reader > 0.0) {
        tokio::select! {
            _ = &mut stop => return Ok(report),
            r = wait_reader(slave, Duration::from_secs_f64(sim.wait_reader)) => r?,
        }
    }
    let period = Duration::from_secs_f64(1.0 / sim.rate);
    let mut tick = tokio::time::interval(period);
    let mut seq: u64 = 0;
    while total == 0 || seq < total {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let line = match usize::try_from(seq).ok().and_then(|i| replay.get(i)) {
            Some(sentence) => format!("{sentence}\r\n"),
            None => format!(
                "{{\"device\":\"{}\",\"seq\":{seq},\"temperature\":{:.2}}}\n",
                sim.device,
                rng.random_range(15.0..25.0)
            ),
        };
        seq += 1;
        let mut out = line.into_bytes();
        damage(&sim, &mut rng, &mut out, &mut report);
        if let Some((master, _)) = port.as_mut() {
            match tokio::time::timeout(Duration::from_millis(200), master.write_all(&out)).await {
                Ok(Ok(())) => report.lines += 1,
                _ => report.unwritten += 1,
            }
        }
    }
    // Let the gateway read what is buffered before the pty goes away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = std::fs::remove_file(&sim.link);
    drop(port.take());
    Ok(report)
}
