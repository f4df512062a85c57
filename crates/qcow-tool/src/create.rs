//! `qcow-tool create`: format a new qcow2 image, as `qemu-img create -f qcow2` does.

use std::path::PathBuf;

use qcow::block::{FileDevice, FileOptions};
use qcow::{Compat, Config, CreateOptions, Image, Preallocation};

use crate::error::{Context, Error, Result};
use crate::open::{self, Format};

/// Arguments of `create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format; only qcow2 can be created.
    #[arg(short = 'f', value_enum, default_value = "qcow2")]
    format: Format,
    /// qemu-img style options: cluster_size=SIZE, refcount_bits=N, compat=0.10|1.1, lazy_refcounts=on|off,
    /// preallocation=off|metadata, size=SIZE. May be given more than once.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The file to create; an existing file is overwritten.
    file: PathBuf,
    /// Virtual size in bytes, with an optional K, M, G, T, P or E suffix.
    size: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    if args.format != Format::Qcow2 {
        return Err(Error::msg(format!("cannot create {} images: only qcow2 is supported", args.format.name())));
    }
    let mut options = CreateOptions::new(0);
    for list in &args.options {
        options.apply(list).context(|| "invalid -o option")?;
    }
    match &args.size {
        Some(text) => options.size = open::size(text)?,
        None if args.options.iter().flat_map(|l| l.split(',')).any(|kv| kv.trim().starts_with("size=")) => {}
        None => return Err(Error::msg("missing SIZE: give it after the file name, or as -o size=SIZE")),
    }
    options.validate().context(|| "invalid -o option")?;
    let path = &args.file;
    if !args.quiet {
        println!("{}", formatting_line(&path.display().to_string(), &options));
    }
    let made = FileDevice::create(path, &FileOptions::default())
        .context(|| format!("could not create '{}'", path.display()))
        .and_then(|dev| {
            let image = Image::create(dev, &options, Config::default())
                .context(|| format!("could not format '{}'", path.display()))?;
            image.close().context(|| format!("could not write '{}'", path.display()))
        });
    if made.is_err() {
        // Leave no half-made image behind.
        let _ = std::fs::remove_file(path);
    }
    made
}

/// The line qemu-img prints before it creates an image.
fn formatting_line(file: &str, o: &CreateOptions) -> String {
    let mut line = format!("Formatting '{file}', fmt=qcow2 cluster_size={} extended_l2=off", o.cluster_size);
    if o.preallocation == Preallocation::Metadata {
        line.push_str(" preallocation=metadata");
    }
    line.push_str(&format!(" compression_type=zlib size={}", o.size));
    if o.compat == Compat::V2 {
        line.push_str(" compat=0.10");
    }
    let lazy = if o.lazy_refcounts { "on" } else { "off" };
    line.push_str(&format!(" lazy_refcounts={lazy} refcount_bits={}", o.refcount_bits));
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_formatting_line_matches_qemu_img() {
        assert_eq!(
            formatting_line("a.qcow2", &CreateOptions::new(1 << 30)),
            "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib \
             size=1073741824 lazy_refcounts=off refcount_bits=16"
        );
        let mut o = CreateOptions::new(10 << 20);
        o.apply("cluster_size=4k,refcount_bits=1,lazy_refcounts=on,preallocation=metadata").unwrap();
        assert_eq!(
            formatting_line("c.qcow2", &o),
            "Formatting 'c.qcow2', fmt=qcow2 cluster_size=4096 extended_l2=off preallocation=metadata \
             compression_type=zlib size=10485760 lazy_refcounts=on refcount_bits=1"
        );
    }
}
