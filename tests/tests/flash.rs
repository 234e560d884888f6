//! `cross/flash`, end to end: each test builds a small disk image like Raspberry Pi OS Lite
//! (a partition table, a FAT partition, an ext4 root made from a fixture tree with the
//! `/lib -> usr/lib` link of a merged `/usr`), runs the script, and reads every output image
//! back with debugfs. The fleet test flashes the real gateway binary and runs the copy it
//! reads back on the config it reads back.
//!
//! Needs e2fsprogs (debugfs, e2fsck, mkfs.ext4), fdisk (sfdisk), jq and openssl, which
//! `.ci/setup` installs.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use gateway_e2e::harness::gateway_bin;

const MIB: u64 = 1 << 20;
/// The FAT partition starts at 1 MiB and is 8 MiB long; the root partition follows.
const FAT_START: u64 = MIB;
const FAT_LEN: u64 = 8 * MIB;
const ROOT_START: u64 = FAT_START + FAT_LEN;
/// Devices of the CSV: gateway id and the extra `site` column.
const DEVICES: [(&str, &str); 2] = [("gw-0001", "berlin"), ("gw-0002", "paris")];
const UNIT: &str = "/lib/systemd/system/edge-gateway.service";
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/edge-gateway.service";

const TEMPLATE: &str = r#"# gateway.toml for {{gateway_id}} at {{site}}
[gateway]
id = "{{gateway_id}}"
state_dir = "/var/lib/edge-gateway"

[[inputs]]
name = "site"
type = "mqtt"
host = "mqtt.{{site}}.example"
topics = ["sensors/{device}/telemetry"]
tls = { ca_file = "/etc/ssl/certs/ca-certificates.crt", client_cert_file = "/run/credentials/edge-gateway.service/secrets_client.crt", client_key_file = "/run/credentials/edge-gateway.service/secrets_client.key" }

[output.kafka]
brokers = "kafka.example:9092"
"#;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// A system tool, also found in the sbin directories that a user's PATH may lack.
fn tool(name: &str) -> Command {
    let path = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| name.into());
    let mut cmd = Command::new(path);
    cmd.env("DEBUGFS_PAGER", "__none__");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (.ci/setup installs e2fsprogs, fdisk, jq, openssl)")
    })
}

fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Whether two files hold the same bytes, read in chunks (images and binaries are large).
fn same_bytes(a: &Path, b: &Path) -> bool {
    let open = |p: &Path| fs::File::open(p).unwrap_or_else(|e| panic!("open {p:?}: {e}"));
    let (mut fa, mut fb) = (open(a), open(b));
    if fa.metadata().expect("metadata").len() != fb.metadata().expect("metadata").len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    loop {
        let n = fa.read(&mut ba).expect("read");
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {path:?}: {e}"))
}

fn head(path: &Path, len: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    fs::File::open(path)
        .expect("open image")
        .take(len)
        .read_to_end(&mut buf)
        .expect("read image");
    buf
}

/// A directory tree like a small OS root: a merged /usr, a unit enabled the usual way.
fn os_tree(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in [
        "etc/systemd/system/multi-user.target.wants",
        "usr/bin",
        "usr/lib/systemd/system",
        "var/lib",
    ] {
        fs::create_dir_all(root.join(d)).expect("fixture dir");
    }
    symlink("usr/lib", root.join("lib")).expect("/lib link");
    fs::write(root.join("etc/hostname"), "raspberrypi\n").expect("fixture file");
    fs::write(
        root.join("usr/lib/systemd/system/ssh.service"),
        "[Unit]\nDescription=OpenBSD Secure Shell server\n",
    )
    .expect("fixture file");
    symlink(
        "/lib/systemd/system/ssh.service",
        root.join("etc/systemd/system/multi-user.target.wants/ssh.service"),
    )
    .expect("fixture link");
    fs::write(root.join("usr/bin/hello"), "#!/bin/sh\necho hello\n").expect("fixture file");
    root
}

/// Makes a sparse disk image of `len` bytes with the partitions of the sfdisk script
/// `table`, a marker in the FAT partition, and, if `root` is given, an ext4 file system
/// made from `tree` at (start, length) in bytes.
fn make_image(path: &Path, len: u64, table: &str, root: Option<(u64, u64, &Path)>) {
    let mut f = fs::File::create(path).expect("create image");
    f.set_len(len).expect("size image");
    f.seek(SeekFrom::Start(FAT_START)).expect("seek");
    f.write_all(&b"FAT PARTITION, LEAVE ALONE. ".repeat(200))
        .expect("marker");
    drop(f);
    let mut sfdisk = tool("sfdisk")
        .arg("--quiet")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sfdisk (Debian package fdisk; .ci/setup installs it)");
    sfdisk
        .stdin
        .take()
        .expect("stdin")
        .write_all(table.as_bytes())
        .expect("sfdisk script");
    let out = sfdisk.wait_with_output().expect("sfdisk");
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some((start, size, tree)) = root {
        run_ok(
            tool("mkfs.ext4")
                .args(["-F", "-q", "-b", "4096", "-L", "rootfs", "-E"])
                .arg(format!("offset={start}"))
                .arg("-d")
                .arg(tree)
                .arg(path)
                .arg(format!("{}k", size / 1024)),
        );
    }
}

/// An MBR image like Raspberry Pi OS: partition 1 FAT (type c), partition 2 ext4 (type 83).
fn mbr_image(path: &Path, root_len: u64, tree: &Path) {
    let table = format!(
        "label: dos\nstart={}, size={}, type=c\nstart={}, size={}, type=83\n",
        FAT_START / 512,
        FAT_LEN / 512,
        ROOT_START / 512,
        root_len / 512
    );
    make_image(
        path,
        ROOT_START + root_len,
        &table,
        Some((ROOT_START, root_len, tree)),
    );
}

/// A base image, identities, a CSV, a template and trusted keys in a temporary directory.
struct Fleet {
    dir: tempfile::TempDir,
    base: PathBuf,
    csv: PathBuf,
    template: PathBuf,
    keys: PathBuf,
}

impl Fleet {
    /// A fleet of [`DEVICES`] on an MBR base image whose root partition is `root_len` bytes.
    fn new(root_len: u64) -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let tree = os_tree(d);
        let base = d.join("base.img");
        mbr_image(&base, root_len, &tree);
        fs::create_dir(d.join("ids")).expect("ids dir");
        let mut csv = String::from("gateway_id,client_cert,client_key,site\n");
        for (id, site) in DEVICES {
            run_ok(
                Command::new("openssl")
                    .current_dir(d.join("ids"))
                    .args(["req", "-x509", "-newkey", "ed25519", "-nodes", "-days", "2"])
                    .args(["-keyout", &format!("{id}.key")])
                    .args(["-out", &format!("{id}.crt")])
                    .args(["-subj", &format!("/CN={id}")]),
            );
            csv.push_str(&format!("{id},ids/{id}.crt,ids/{id}.key,{site}\n"));
        }
        let csv_path = d.join("devices.csv");
        fs::write(&csv_path, csv).expect("csv");
        let template = d.join("gateway.toml.in");
        fs::write(&template, TEMPLATE).expect("template");
        let keys = d.join("trusted-keys");
        fs::create_dir(&keys).expect("keys dir");
        for name in ["ops-2026.pub", "ops-backup.pub"] {
            fs::write(keys.join(name), format!("ed25519 public key {name}\n")).expect("key");
        }
        Fleet {
            dir,
            base,
            csv: csv_path,
            template,
            keys,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn out(&self) -> PathBuf {
        self.path("out")
    }

    /// A stand-in binary for tests that don't need the real one.
    fn small_binary(&self, text: &str) -> PathBuf {
        let p = self.path("small-gateway");
        fs::write(&p, format!("#!/bin/sh\necho {text}\n")).expect("binary");
        p
    }

    /// Runs cross/flash with this fleet's files and `binary`, then `extra` arguments.
    fn flash(&self, binary: &Path, extra: &[&str]) -> Output {
        self.flash_image(&self.base, binary, extra)
    }

    fn flash_image(&self, image: &Path, binary: &Path, extra: &[&str]) -> Output {
        run(Command::new("bash")
            .arg(repo_file("cross/flash"))
            .arg("--image")
            .arg(image)
            .arg("--binary")
            .arg(binary)
            .arg("--config")
            .arg(&self.template)
            .arg("--identities")
            .arg(&self.csv)
            .arg("--trusted-keys")
            .arg(&self.keys)
            .arg("--out")
            .arg(self.out())
            .args(extra))
    }

    fn root(&self, id: &str) -> Ext4 {
        Ext4::new(&self.out().join(format!("{id}.img")), ROOT_START)
    }
}

fn assert_flash_ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cross/flash failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that cross/flash failed with exit code 1 and a message containing each of
/// `needles`, and wrote no image.
fn assert_flash_error(f: &Fleet, out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("flash: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "the error names {n:?}: {stderr}");
    }
    let left: Vec<_> = fs::read_dir(f.out())
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "nothing left in --out: {left:?}");
}

/// What debugfs `stat` says about an inode.
#[derive(Debug)]
struct Stat {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: u64,
    link: Option<String>,
}

/// An ext4 file system inside an image file, read with debugfs.
struct Ext4 {
    spec: String,
}

impl Ext4 {
    fn new(image: &Path, offset: u64) -> Ext4 {
        Ext4 {
            spec: format!("{}?offset={offset}", image.display()),
        }
    }

    fn debugfs(&self, request: &str) -> Output {
        run(tool("debugfs").arg("-R").arg(request).arg(&self.spec))
    }

    fn try_stat(&self, path: &str) -> Option<Stat> {
        let out = self.debugfs(&format!("stat {path}"));
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.starts_with("Inode:") {
            return None;
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        let after = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
                .copied()
                .unwrap_or_else(|| panic!("no {key} in debugfs stat {path}: {text}"))
        };
        let num = |key: &str| {
            after(key)
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("{key} in stat {path}: {e}"))
        };
        let mtime = after("mtime:");
        let mtime = mtime.split(':').next().unwrap_or(mtime);
        Some(Stat {
            kind: after("Type:").to_string(),
            mode: u32::from_str_radix(after("Mode:"), 8).expect("octal mode"),
            uid: num("User:") as u32,
            gid: num("Group:") as u32,
            size: num("Size:"),
            mtime: u64::from_str_radix(mtime.trim_start_matches("0x"), 16).expect("hex mtime"),
            link: text.lines().find_map(|l| {
                l.strip_prefix("Fast link dest: ")
                    .map(|d| d.trim_matches('"').to_string())
            }),
        })
    }

    fn stat(&self, path: &str) -> Stat {
        self.try_stat(path)
            .unwrap_or_else(|| panic!("{path} is missing in {}", self.spec))
    }

    /// Asserts `path` is a `kind` ("regular", "directory", "symlink") with `mode`, root's.
    fn assert_node(&self, path: &str, kind: &str, mode: u32) -> Stat {
        let st = self.stat(path);
        assert_eq!(st.kind, kind, "{path}: {st:?}");
        assert_eq!(st.mode, mode, "{path}: mode {:o}, want {mode:o}", st.mode);
        assert_eq!((st.uid, st.gid), (0, 0), "{path} is root's: {st:?}");
        st
    }

    fn cat(&self, path: &str) -> Vec<u8> {
        let out = self.debugfs(&format!("cat {path}"));
        assert!(out.status.success(), "debugfs cat {path}");
        out.stdout
    }

    fn dump(&self, path: &str, to: &Path) {
        let out = self.debugfs(&format!("dump {path} {}", to.display()));
        assert!(to.exists(), "debugfs dump {path}: {out:?}");
    }

    fn assert_fsck_clean(&self) {
        let out = run(tool("e2fsck").arg("-fn").arg(&self.spec));
        assert!(
            out.status.success(),
            "e2fsck -fn {}: {}{}",
            self.spec,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `program` through `GATEWAY_RUNNER` when that is set (qemu-user for ARM test
/// runs, like the harness does for the gateway it starts).
fn runner_command(program: &Path) -> Command {
    let runner = std::env::var("GATEWAY_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(first) => {
            let mut cmd = Command::new(first);
            cmd.args(words).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

#[test]
fn flashes_each_device_of_a_csv_into_its_own_image() {
    let bin = gateway_bin();
    let bin_len = fs::metadata(&bin)
        .unwrap_or_else(|e| panic!("the gateway binary {bin:?}: {e}"))
        .len();
    // Room for the binary (a debug build is large), ext4's own data and the fixture.
    let root_len = (bin_len + bin_len / 4 + 48 * MIB).div_ceil(MIB) * MIB;
    let f = Fleet::new(root_len);
    let base_copy = f.path("base.copy");
    fs::copy(&f.base, &base_copy).expect("copy base");
    let started = now();

    let stdout = assert_flash_ok(&f.flash(&bin, &[]));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), DEVICES.len(), "one line per device: {stdout}");
    for ((id, _), line) in DEVICES.iter().zip(&lines) {
        assert!(line.starts_with(id), "{line}");
    }
    let mut images: Vec<_> = fs::read_dir(f.out())
        .expect("out dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    images.sort();
    assert_eq!(images, ["gw-0001.img", "gw-0002.img"], "and nothing else");

    for image in &images {
        let mode = fs::metadata(f.out().join(image))
            .expect("image")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "{image} holds a private key: owner only"
        );
    }

    let unit = read(&repo_file("cross/debian/edge-gateway.service"));
    let sysusers = read(&repo_file("cross/debian/edge-gateway.sysusers"));
    for (id, site) in DEVICES {
        let img = f.out().join(format!("{id}.img"));
        let root = f.root(id);
        root.assert_fsck_clean();
        assert!(
            head(&img, ROOT_START) == head(&f.base, ROOT_START),
            "{id}: partition table and FAT partition untouched"
        );

        // The binary: the same bytes, and it runs on the config it was given.
        let st = root.assert_node("/usr/bin/edge-gateway", "regular", 0o755);
        assert_eq!(st.size, bin_len);
        let bin_back = f.path(&format!("{id}.gateway"));
        root.dump("/usr/bin/edge-gateway", &bin_back);
        assert!(same_bytes(&bin_back, &bin), "{id}: the binary reads back");
        fs::set_permissions(&bin_back, fs::Permissions::from_mode(0o755)).expect("chmod");

        root.assert_node("/etc/edge-gateway", "directory", 0o755);
        root.assert_node("/etc/edge-gateway/gateway.toml", "regular", 0o644);
        let config = String::from_utf8(root.cat("/etc/edge-gateway/gateway.toml")).expect("utf-8");
        assert!(config.contains(&format!("id = \"{id}\"\n")), "{config}");
        assert!(config.contains(&format!("host = \"mqtt.{site}.example\"")));
        assert!(config.contains("topics = [\"sensors/{device}/telemetry\"]"));
        assert!(!config.contains("{{"), "no placeholder left: {config}");
        let config_back = f.path(&format!("{id}.toml"));
        fs::write(&config_back, config.as_bytes()).expect("config");
        let check = run_ok(
            runner_command(&bin_back)
                .arg("check-config")
                .arg(config_back.as_path()),
        );
        assert!(
            String::from_utf8_lossy(&check).contains("ok"),
            "check-config"
        );

        // The service, enabled, and its system user.
        root.assert_node(UNIT, "regular", 0o644);
        assert_eq!(root.cat(UNIT), unit);
        // /lib is a link to usr/lib here, as on a merged /usr: the unit lands there.
        root.assert_node(
            "/usr/lib/systemd/system/edge-gateway.service",
            "regular",
            0o644,
        );
        let link = root.assert_node(WANTS, "symlink", 0o777);
        assert_eq!(link.link.as_deref(), Some(UNIT));
        root.assert_node("/usr/lib/sysusers.d", "directory", 0o755);
        root.assert_node("/usr/lib/sysusers.d/edge-gateway.conf", "regular", 0o644);
        assert_eq!(root.cat("/usr/lib/sysusers.d/edge-gateway.conf"), sysusers);
        root.assert_node("/usr/lib/tmpfiles.d/edge-gateway.conf", "regular", 0o644);
        assert_eq!(
            root.cat("/usr/lib/tmpfiles.d/edge-gateway.conf"),
            read(&repo_file("cross/debian/edge-gateway.tmpfile"))
        );
        assert!(
            root.stat("/usr").mtime >= started,
            "/usr is newer than any /etc/.updated, so systemd-sysusers runs at boot"
        );

        // The identity: a root-only directory that systemd's LoadCredential reads.
        root.assert_node("/etc/edge-gateway/credentials", "directory", 0o700);
        for (name, mode) in [("crt", 0o644), ("key", 0o600)] {
            let path = format!("/etc/edge-gateway/credentials/client.{name}");
            root.assert_node(&path, "regular", mode);
            let want = read(&f.path(&format!("ids/{id}.{name}")));
            assert_eq!(root.cat(&path), want, "{id}: {path}");
        }

        root.assert_node("/etc/edge-gateway/trusted-keys", "directory", 0o755);
        for name in ["ops-2026.pub", "ops-backup.pub"] {
            let path = format!("/etc/edge-gateway/trusted-keys/{name}");
            root.assert_node(&path, "regular", 0o644);
            assert_eq!(root.cat(&path), read(&f.keys.join(name)));
        }

        // What the OS had is still there.
        assert_eq!(root.cat("/etc/hostname"), b"raspberrypi\n");
        assert_eq!(root.cat("/usr/bin/hello"), b"#!/bin/sh\necho hello\n");
        let ssh = root.stat("/etc/systemd/system/multi-user.target.wants/ssh.service");
        assert_eq!(ssh.link.as_deref(), Some("/lib/systemd/system/ssh.service"));
        assert!(root
            .try_stat("/usr/lib/systemd/system/ssh.service")
            .is_some());
    }
    assert!(
        same_bytes(&f.base, &base_copy),
        "the base image is unchanged"
    );
}

#[test]
fn replaces_images_only_with_force_and_reflashes_a_flashed_image() {
    let f = Fleet::new(16 * MIB);
    let bin = f.small_binary("one");
    assert_flash_ok(&f.flash(&bin, &[]));
    let again = f.flash(&bin, &[]);
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("gw-0001.img exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_flash_ok(&f.flash(&bin, &["--force"]));
    f.root("gw-0001").assert_fsck_clean();

    // A flashed image as the base: every file is there already and gets replaced.
    let flashed = f.path("flashed.img");
    fs::rename(f.out().join("gw-0001.img"), &flashed).expect("move");
    let bin2 = f.small_binary("two");
    assert_flash_ok(&f.flash_image(&flashed, &bin2, &["--force"]));
    for (id, _) in DEVICES {
        let root = f.root(id);
        root.assert_fsck_clean();
        assert_eq!(root.cat("/usr/bin/edge-gateway"), read(&bin2));
        root.assert_node("/usr/bin/edge-gateway", "regular", 0o755);
        root.assert_node("/etc/edge-gateway/credentials", "directory", 0o700);
        root.assert_node("/etc/edge-gateway/credentials/client.key", "regular", 0o600);
        let config = String::from_utf8(root.cat("/etc/edge-gateway/gateway.toml")).expect("utf-8");
        assert!(config.contains(&format!("id = \"{id}\"")), "{config}");
        root.assert_node(WANTS, "symlink", 0o777);
    }
}

#[test]
fn picks_the_largest_linux_partition_of_a_gpt_image() {
    let f = Fleet::new(16 * MIB);
    let tree = f.path("rootfs");
    let gpt = f.path("gpt.img");
    // 1: an EFI system partition, 2: a small Linux partition without a file system,
    // 3: the ext4 root, larger.
    let (small, root_start, root_len) = (ROOT_START / 512, ROOT_START + 4 * MIB, 16 * MIB);
    let table = format!(
        "label: gpt\n\
         start={}, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         start={small}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n\
         start={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        FAT_START / 512,
        FAT_LEN / 512,
        4 * MIB / 512,
        root_start / 512,
        root_len / 512
    );
    make_image(
        &gpt,
        root_start + root_len + MIB,
        &table,
        Some((root_start, root_len, &tree)),
    );
    let bin = f.small_binary("gpt");
    let stdout = assert_flash_ok(&f.flash_image(&gpt, &bin, &[]));
    assert!(stdout.contains("partition 3"), "{stdout}");
    let root = Ext4::new(&f.out().join("gw-0002.img"), root_start);
    root.assert_fsck_clean();
    assert_eq!(root.cat("/usr/bin/edge-gateway"), read(&bin));
    assert_eq!(root.cat("/etc/hostname"), b"raspberrypi\n");

    // Naming the empty Linux partition is an error that says what is wrong.
    fs::remove_dir_all(f.out()).expect("clean out");
    let out = f.flash_image(&gpt, &bin, &["--root-partition", "2"]);
    assert_flash_error(&f, &out, &["partition 2", "no ext4 file system"]);
}

#[test]
fn a_missing_csv_column_is_named() {
    let f = Fleet::new(16 * MIB);
    fs::write(&f.csv, "gateway_id,client_cert\ngw-0001,ids/gw-0001.crt\n").expect("csv");
    let out = f.flash(&f.small_binary("x"), &[]);
    assert_flash_error(&f, &out, &["missing column 'client_key'"]);
}

#[test]
fn an_unknown_placeholder_is_named() {
    let f = Fleet::new(16 * MIB);
    fs::write(&f.template, format!("{TEMPLATE}# {{{{region}}}}\n")).expect("template");
    let out = f.flash(&f.small_binary("x"), &[]);
    assert_flash_error(&f, &out, &["unknown placeholder {{region}}"]);
}

#[test]
fn an_image_without_an_ext4_root_is_refused() {
    let f = Fleet::new(16 * MIB);
    let bin = f.small_binary("x");

    // Only a FAT partition: no Linux partition at all.
    let fat_only = f.path("fat-only.img");
    let table = format!(
        "label: dos\nstart={}, size={}, type=c\n",
        FAT_START / 512,
        FAT_LEN / 512
    );
    make_image(&fat_only, FAT_START + FAT_LEN, &table, None);
    let out = f.flash_image(&fat_only, &bin, &[]);
    assert_flash_error(&f, &out, &["no Linux partition", "--root-partition"]);

    // A Linux partition that holds no file system.
    let empty_root = f.path("empty-root.img");
    let table = format!(
        "label: dos\nstart={}, size={}, type=c\nstart={}, size={}, type=83\n",
        FAT_START / 512,
        FAT_LEN / 512,
        ROOT_START / 512,
        16 * MIB / 512
    );
    make_image(&empty_root, ROOT_START + 16 * MIB, &table, None);
    let out = f.flash_image(&empty_root, &bin, &[]);
    assert_flash_error(&f, &out, &["partition 2", "no ext4 file system"]);

    // No partition table at all.
    let raw = f.path("raw.img");
    fs::File::create(&raw)
        .and_then(|file| file.set_len(16 * MIB))
        .expect("raw image");
    let out = f.flash_image(&raw, &bin, &[]);
    assert_flash_error(&f, &out, &["no partition table"]);
}

#[test]
fn a_binary_for_another_architecture_is_refused() {
    let f = Fleet::new(16 * MIB);
    // ELF headers that differ only in the machine: an aarch64 OS, an x86-64 gateway.
    let elf = |machine: u8| {
        let mut h = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0".to_vec();
        h.extend([machine, 0]);
        h.extend([0u8; 44]);
        h
    };
    let tree = f.path("rootfs");
    fs::write(tree.join("usr/bin/env"), elf(183)).expect("fixture env");
    let arm = f.path("arm.img");
    mbr_image(&arm, 16 * MIB, &tree);
    let bin = f.path("gateway-x86-64");
    fs::write(&bin, elf(62)).expect("binary");
    let out = f.flash_image(&arm, &bin, &[]);
    assert_flash_error(&f, &out, &["built for x86-64", "for aarch64"]);
}
