//! Crafted tar layers against [`apply_layer`]: each attack of issue #19 on image extraction.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

/// One tar entry as an attacker may write it (paths are put in the header verbatim).
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    Device(&'a str, tar::EntryType, u32, u32),
}

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    let name = &mut h.as_gnu_mut().expect("gnu").name;
    name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn link_header(path: &str, kind: tar::EntryType, target: &str) -> tar::Header {
    let mut h = header(path, kind, 0o777, 0);
    let l = &mut h.as_gnu_mut().expect("gnu").linkname;
    l[..target.len()].copy_from_slice(target.as_bytes());
    h
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (mut h, data): (tar::Header, &[u8]) = match e {
            E::Dir(p, mode) => (header(p, tar::EntryType::Directory, *mode, 0), &[]),
            E::File(p, mode, d) => (header(p, tar::EntryType::Regular, *mode, d.len() as u64), d),
            E::Symlink(p, t) => (link_header(p, tar::EntryType::Symlink, t), &[]),
            E::HardLink(p, t) => (link_header(p, tar::EntryType::Link, t), &[]),
            E::Device(p, kind, major, minor) => {
                let mut h = header(p, *kind, 0o666, 0);
                h.set_device_major(*major).expect("major");
                h.set_device_minor(*minor).expect("minor");
                (h, &[])
            }
        };
        h.set_cksum();
        b.append(&h, data).expect("append");
    }
    b.into_inner().expect("tar")
}

/// A tree `root` inside a directory that also holds `outside/`, the place attacks aim at.
struct Tree {
    dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

fn tree() -> Tree {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = fs::canonicalize(dir.path()).expect("canonical");
    let root = base.join("root");
    let outside = base.join("outside");
    fs::create_dir(&root).expect("root");
    fs::create_dir(&outside).expect("outside");
    Tree { dir, root, outside }
}

impl Tree {
    fn apply(&self, bytes: &[u8]) -> Result<(), LayerError> {
        self.apply_with(
            bytes,
            Compression::None,
            &mut Budget::new(Limits::default()),
        )
    }

    fn apply_with(
        &self,
        bytes: &[u8],
        c: Compression,
        budget: &mut Budget,
    ) -> Result<(), LayerError> {
        let f = self.dir.path().join("layer.tar");
        fs::write(&f, bytes).expect("write layer");
        let r = apply_layer(&self.root, &f, c, budget);
        fs::remove_file(&f).expect("remove layer");
        r
    }

    fn outside_is_untouched(&self) {
        let left: Vec<_> = fs::read_dir(&self.outside)
            .expect("outside")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "written outside the image: {left:?}");
    }
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers() {
    let t = tree();
    t.apply(&layer(&[
        E::Dir("etc/", 0o755),
        E::File("etc/a", 0o644, b"a"),
        E::File("etc/b", 0o644, b"b"),
        E::Dir("var/", 0o755),
        E::File("var/old", 0o644, b"x"),
        E::Dir("var/sub/", 0o755),
        E::File("var/sub/deep", 0o644, b"x"),
    ]))
    .expect("lower");
    t.apply(&layer(&[
        E::File("etc/.wh.a", 0o644, b""),
        E::Dir("var/", 0o755),
        E::File("var/.wh..wh..opq", 0o644, b""),
        E::File("var/new", 0o644, b"n"),
    ]))
    .expect("upper");
    assert!(!t.root.join("etc/a").exists());
    assert_eq!(fs::read(t.root.join("etc/b")).expect("b"), b"b");
    assert!(!t.root.join("var/old").exists());
    assert!(!t.root.join("var/sub").exists());
    assert_eq!(fs::read(t.root.join("var/new")).expect("new"), b"n");
}

#[test]
fn entry_paths_leaving_the_root_are_refused() {
    let t = tree();
    for path in ["../outside/evil", "a/../../outside/evil", "/outside/evil"] {
        let e = t
            .apply(&layer(&[E::File(path, 0o644, b"x")]))
            .expect_err(path);
        assert_eq!(<&str>::from(&e), "ImageUnsafeEntry", "{path}: {e}");
    }
    t.outside_is_untouched();
}

#[test]
fn a_symlink_at_a_middle_component_stays_inside_the_image() {
    let t = tree();
    let outside = t.outside.to_str().expect("utf8");
    t.apply(&layer(&[
        // Absolute and `..` symlinks used as directories: resolved as in the image's own root.
        E::Symlink("abs", "/"),
        E::Symlink("up", "../../../.."),
        E::Symlink("usr-outside", outside),
        E::Dir("lib/", 0o755),
        E::Symlink("lib/up", "../../.."),
        E::File("abs/etc-owned", 0o644, b"1"),
        E::File("up/up-owned", 0o644, b"2"),
        E::File("lib/up/nested-owned", 0o644, b"3"),
    ]))
    .expect("contained layer");
    for f in ["etc-owned", "up-owned", "nested-owned"] {
        assert!(t.root.join(f).is_file(), "{f} not in the image root");
    }
    t.outside_is_untouched();
    // A symlink to a host directory names a path of the image, which does not exist there:
    // no directory is made anywhere, on the host or in the image (the old `inside()` created
    // them on the host before checking).
    let e = t
        .apply(&layer(&[E::File("usr-outside/a/b/c", 0o644, b"x")]))
        .expect_err("dangling in the image");
    assert_eq!(<&str>::from(&e), "ImageUnsafeEntry", "{e}");
    t.outside_is_untouched();
    // Whiteouts resolve their directory the same way.
    fs::write(t.outside.join("keep"), b"k").expect("keep");
    t.apply(&layer(&[E::File("abs/.wh.keep", 0o644, b"")]))
        .expect("whiteout");
    t.apply(&layer(&[E::File("up/.wh..wh..opq", 0o644, b"")]))
        .expect("opaque at root");
    assert!(t.outside.join("keep").exists());
}

#[test]
fn a_symlink_at_the_last_component_is_replaced_not_written_through() {
    let t = tree();
    let target = t.outside.join("victim");
    t.apply(&layer(&[E::Symlink(
        "etc-passwd",
        target.to_str().expect("utf8"),
    )]))
    .expect("symlink");
    t.apply(&layer(&[E::File("etc-passwd", 0o644, b"pwned")]))
        .expect("file over symlink");
    assert!(!target.exists());
    let m = fs::symlink_metadata(t.root.join("etc-passwd")).expect("meta");
    assert!(m.is_file());
    t.outside_is_untouched();
}

#[test]
fn hard_links_only_name_files_of_the_image() {
    let t = tree();
    fs::write(t.outside.join("secret"), b"s").expect("secret");
    let outside = t.outside.to_str().expect("utf8");
    for target in ["../outside/secret", "/etc/passwd"] {
        let e = t
            .apply(&layer(&[E::HardLink("h", target)]))
            .expect_err(target);
        assert_eq!(<&str>::from(&e), "ImageUnsafeEntry", "{target}: {e}");
    }
    // Through a symlinked directory: resolved in the image, where it does not exist.
    let e = t
        .apply(&layer(&[
            E::Symlink("d", outside),
            E::HardLink("h", "d/secret"),
        ]))
        .expect_err("through a symlink");
    assert!(matches!(e, LayerError::Io(_)), "{e}");
    assert_eq!(
        fs::metadata(t.outside.join("secret")).expect("s").nlink(),
        1
    );
    // A link to a symlink links the symlink itself, never what it points at.
    t.apply(&layer(&[
        E::Symlink("s", "/etc/passwd"),
        E::HardLink("h2", "s"),
        E::File("f", 0o644, b"f"),
        E::HardLink("h3", "f"),
    ]))
    .expect("links inside");
    assert!(
        fs::symlink_metadata(t.root.join("h2"))
            .expect("h2")
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::metadata(t.root.join("f")).expect("f").nlink(), 2);
}

#[test]
fn device_nodes_and_set_id_bits_are_dropped() {
    let t = tree();
    t.apply(&layer(&[
        E::Dir("dev/", 0o755),
        E::Device("dev/sda", tar::EntryType::Block, 8, 0),
        E::Device("dev/mem", tar::EntryType::Char, 1, 1),
        E::File("bin-su", 0o4755, b"#!/bin/sh\n"),
        E::File("bin-wall", 0o2755, b"#!/bin/sh\n"),
        E::Dir("shared/", 0o2775),
        E::Dir("tmp/", 0o1777),
    ]))
    .expect("layer");
    assert!(!t.root.join("dev/sda").exists());
    assert!(!t.root.join("dev/mem").exists());
    let mode = |p: &str| fs::metadata(t.root.join(p)).expect(p).permissions().mode() & 0o7777;
    assert_eq!(mode("bin-su"), 0o755);
    assert_eq!(mode("bin-wall"), 0o755);
    assert_eq!(mode("shared"), 0o775);
    // The sticky bit is no privilege: /tmp keeps it.
    assert_eq!(mode("tmp"), 0o1777);
}

#[test]
fn a_decompression_bomb_stops_at_the_unpacked_limit() {
    let t = tree();
    let zeros = vec![0u8; 64 << 20];
    let tar = layer(&[E::File("bomb", 0o644, &zeros)]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    assert!(gz.len() < 1 << 20, "the bomb is small: {}", gz.len());
    let limits = Limits {
        unpacked_bytes: 4 << 20,
        ..Limits::default()
    };
    let e = t
        .apply_with(&gz, Compression::Gzip, &mut Budget::new(limits))
        .expect_err("bomb");
    assert_eq!(<&str>::from(&e), "ImageTooLarge", "{e}");
    assert!(e.is_limit());
    assert!(e.to_string().contains("--image-max-unpacked"), "{e}");
    // Stopped at the limit (plus one read buffer), not after 64 MiB.
    let written = fs::metadata(t.root.join("bomb")).expect("bomb").len();
    assert!(written <= (4 << 20) + (128 << 10), "{written}");
}

#[test]
fn limits_count_over_all_layers_of_an_image() {
    let t = tree();
    let limits = Limits {
        unpacked_bytes: 1 << 20,
        entries: 5,
        ..Limits::default()
    };
    let mut budget = Budget::new(limits);
    let chunk = vec![1u8; 600 << 10];
    t.apply_with(
        &layer(&[E::File("a", 0o644, &chunk)]),
        Compression::None,
        &mut budget,
    )
    .expect("first layer fits");
    let e = t
        .apply_with(
            &layer(&[E::File("b", 0o644, &chunk)]),
            Compression::None,
            &mut budget,
        )
        .expect_err("second layer passes the limit");
    assert_eq!(<&str>::from(&e), "ImageTooLarge");
    let many: Vec<E> = ["1", "2", "3", "4", "5", "6"]
        .iter()
        .map(|n| E::File(n, 0o644, b""))
        .collect();
    let e = t
        .apply_with(&layer(&many), Compression::None, &mut Budget::new(limits))
        .expect_err("entries");
    assert!(matches!(e, LayerError::TooManyEntries { limit: 5 }), "{e}");
}
