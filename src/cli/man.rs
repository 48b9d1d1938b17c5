//! The man page, rendered from the clap grammar plus the sections clap
//! has no place for (exit status, environment, files, examples).

use std::io::Write;

use super::args::{Cli, ENVIRONMENT};
use super::exit;

/// Files kmsfs reads or writes, for the man page.
const FILES: &[(&str, &str)] = &[
    ("CIPHERDIR/kmsfs.conf", "the volume config (JSON, authenticated by a MAC under the volume's key)"),
    ("CIPHERDIR/.kmsfs.lock", "held by every mount; rewrap and upgrade take it exclusively"),
    (
        "/var/lib/kmsfs/trust/ (root), ~/.local/state/kmsfs/trust/ (others), $KMSFS_TRUST_DIR",
        "the keys this host trusts, per volume ID",
    ),
    ("/etc/kmsfs/NAME.env", "settings of the kmsfs@NAME systemd unit"),
    ("$CREDENTIALS_DIRECTORY/kmsfs.key", "a local key handed over by systemd (LoadCredential=)"),
];

/// Examples, for the man page.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "Create a volume with a local key and mount it:",
        "kmsfs init /srv/c --key-file /etc/kmsfs/c.key\nkmsfs mount /srv/c /srv/p",
    ),
    ("Create a volume under an AWS KMS key:", "kmsfs --region eu-west-1 init /srv/c --kms-key alias/kmsfs"),
    ("Mount from fstab:", "/srv/c /srv/p fuse.kmsfs key_file=/etc/kmsfs/c.key,allow_other,nofail,_netdev 0 0"),
    ("Run as a systemd service:", "systemctl enable --now kmsfs@docs"),
    (
        "Check every block, then rotate to a new KMS key:",
        "kmsfs fsck /srv/c\nkmsfs rewrap /srv/c --to-key alias/kmsfs-2 --dry-run\nkmsfs rewrap /srv/c --to-key alias/kmsfs-2",
    ),
    (
        "Describe a volume and export mount statistics:",
        "kmsfs info /srv/c\nkmsfs stats /srv/p --format prometheus > /var/lib/node_exporter/kmsfs.prom",
    ),
];

/// Escapes text for roff.
fn roff(t: &str) -> String {
    t.replace('\\', "\\e")
        .replace('-', "\\-")
        .lines()
        .map(|l| if l.starts_with(['.', '\'']) { format!("\\&{l}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The man page: the main command, then every subcommand with its
/// options (mount's -o options among them), exit status, environment,
/// files and examples.
pub(super) fn manpage(w: &mut dyn Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command().after_help("");
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    writeln!(
        w,
        ".SH OPTIONS\n.TP\n.B \\-\\-region \\fIREGION\\fR\nAWS region for KMS (sets AWS_REGION); any command.\n\
         .TP\n.B \\-\\-profile \\fINAME\\fR\nAWS profile for KMS credentials and region (sets AWS_PROFILE); any command.\n\
         .TP\n.B \\-h, \\-\\-help\nPrint help.\n.TP\n.B \\-V, \\-\\-version\nPrint the version."
    )?;
    writeln!(w, ".SH COMMANDS")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let mut buf = Vec::new();
        let m = clap_mangen::Man::new(sub.clone());
        m.render_synopsis_section(&mut buf)?;
        m.render_description_section(&mut buf)?;
        m.render_options_section(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        writeln!(w, ".SS \"kmsfs {}\"", sub.get_name())?;
        // Each subcommand's sections become paragraphs of its subsection.
        for line in text.lines() {
            match line {
                ".SH SYNOPSIS" | ".SH NAME" => {}
                ".SH DESCRIPTION" => writeln!(w, ".PP")?,
                ".SH OPTIONS" => writeln!(w, ".PP\n.I Options:")?,
                l if l.starts_with(".SH") => writeln!(w, ".PP\n.I {}", l.trim_start_matches(".SH ").trim_matches('"'))?,
                l => writeln!(w, "{l}")?,
            }
        }
    }
    writeln!(w, ".SH \"EXIT STATUS\"")?;
    for line in exit::TABLE.lines().skip(1) {
        match line.trim_start().split_once("  ") {
            Some((code, what)) if code.len() == 1 => writeln!(w, ".TP\n.B {code}\n{}", roff(what.trim()))?,
            _ => writeln!(w, "{}", roff(line.trim()))?,
        }
    }
    writeln!(w, ".SH ENVIRONMENT")?;
    let mut pending: Vec<&str> = Vec::new();
    for line in ENVIRONMENT.lines().skip(1) {
        let t = line.trim();
        if line.starts_with("  ") && !line.starts_with("   ") {
            if !pending.is_empty() {
                writeln!(w, "{}", roff(&pending.join(" ")))?;
                pending.clear();
            }
            let (name, rest) = t.split_once("  ").unwrap_or((t, ""));
            writeln!(w, ".TP\n.B {}", roff(name.trim()))?;
            if !rest.trim().is_empty() {
                pending.push(rest.trim());
            }
        } else {
            pending.push(t);
        }
    }
    if !pending.is_empty() {
        writeln!(w, "{}", roff(&pending.join(" ")))?;
    }
    writeln!(w, ".SH FILES")?;
    for (f, what) in FILES {
        writeln!(w, ".TP\n.I {}\n{}", roff(f), roff(what))?;
    }
    writeln!(w, ".SH EXAMPLES")?;
    for (what, ex) in EXAMPLES {
        writeln!(w, ".PP\n{}\n.PP\n.RS 4\n.nf\n{}\n.fi\n.RE", roff(what), roff(ex))?;
    }
    writeln!(w, ".SH \"SEE ALSO\"\n.BR fusermount3 (1),\n.BR mount.fuse3 (8),\n.BR systemd.exec (5)")?;
    man.render_version_section(w)?;
    Ok(())
}
