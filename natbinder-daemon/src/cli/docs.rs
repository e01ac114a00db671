//! Man pages and shell completions, generated from the command line's own definitions so that they
//! never say something else than `--help` (`natbinder generate-docs`, which `cargo xtask deb` runs).
use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// natbinder(8) and natbinder-COMMAND(8) into `man_dir`; bash, zsh and fish completions into
/// `completions_dir` (named as those shells look for them: natbinder, _natbinder, natbinder.fish).
pub fn generate(man_dir: &Path, completions_dir: &Path) -> Result<()> {
    for dir in [man_dir, completions_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    write_main_page(&command, man_dir)?;
    for subcommand in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man(subcommand, man_dir)?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "natbinder", completions_dir)
            .with_context(|| format!("writing the {shell} completions to {}", completions_dir.display()))?;
    }
    Ok(())
}

fn man_page(command: &clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(command.clone())
        .section("8")
        .manual("natbinder")
        .source(concat!("natbinder ", env!("CARGO_PKG_VERSION")))
}

fn write_man(command: &clap::Command, dir: &Path) -> Result<()> {
    let path =
        man_page(command).generate_to(dir).with_context(|| format!("writing a man page to {}", dir.display()))?;
    tracing::debug!("wrote {}", path.display());
    Ok(())
}

/// The files natbinder reads and writes, for natbinder(8)'s FILES section (`--help` lists them in its
/// own words, after_long_help; a man page wants them as a tagged list).
const FILES: &[(&str, &str)] = &[
    ("/etc/natbinder/natbinder.toml", "The configuration: policy, limits, gateway. Every key is commented."),
    ("/etc/natbinder/natbinder.d/*.toml", "Drop-ins, read in name order after the main file; later keys win."),
    (
        "/usr/lib/natbinder/",
        "The vendor's defaults, natbinder.toml and natbinder.d/*.toml: each read when /etc/natbinder has no file \
         of the same name.",
    ),
    ("/var/lib/natbinder/", "The journal of mappings (removed after a crash), static and disabled mappings."),
    ("/run/natbinder/io.natbinder", "The control socket the other commands talk to."),
];

/// natbinder(8): clap's sections, with FILES and SEE ALSO in place of the plain-text epilogue.
fn write_main_page(command: &clap::Command, dir: &Path) -> Result<()> {
    let page = man_page(command);
    let mut roff = Vec::new();
    page.render_title(&mut roff)?;
    page.render_name_section(&mut roff)?;
    page.render_synopsis_section(&mut roff)?;
    page.render_description_section(&mut roff)?;
    page.render_options_section(&mut roff)?;
    page.render_subcommands_section(&mut roff)?;
    roff.extend_from_slice(b".SH FILES\n");
    for (path, what) in FILES {
        roff.extend_from_slice(format!(".TP\n\\fI{path}\\fR\n{what}\n").as_bytes());
    }
    roff.extend_from_slice(
        b".SH SEE ALSO\n\\fBnatbinder-doctor\\fR(8), \\fBnatbinder-run\\fR(8), \\fBsystemd.service\\fR(5), \\fBjournalctl\\fR(1)\n",
    );
    page.render_version_section(&mut roff)?;
    let path = dir.join(page.get_filename());
    std::fs::write(&path, roff).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_visible_command_gets_a_man_page_and_each_shell_its_completions() {
        let dir = std::env::temp_dir().join(format!("natbinder-docs-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        generate(&dir.join("man"), &dir.join("completions")).unwrap();
        let mut pages: Vec<String> = std::fs::read_dir(dir.join("man"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        pages.sort();
        for page in
            ["natbinder.8", "natbinder-daemon.8", "natbinder-run.8", "natbinder-doctor.8", "natbinder-check-config.8"]
        {
            assert!(pages.contains(&page.to_string()), "{page} missing from {pages:?}");
        }
        assert!(!pages.iter().any(|p| p.contains("generate-docs")), "the hidden command has no page: {pages:?}");
        let run = std::fs::read_to_string(dir.join("man/natbinder-run.8")).unwrap();
        assert!(run.contains(".TH natbinder-run 8") && run.contains("EADDRINUSE"), "{run}");
        let main = std::fs::read_to_string(dir.join("man/natbinder.8")).unwrap();
        assert!(main.contains(".SH FILES") && main.contains("/etc/natbinder/natbinder.d/*.toml"), "{main}");
        assert!(main.contains(".SH SEE ALSO") && !main.contains(".SH EXTRA"), "{main}");
        for file in ["natbinder.bash", "_natbinder", "natbinder.fish"] {
            let text = std::fs::read_to_string(dir.join("completions").join(file)).unwrap();
            assert!(text.contains("doctor") && text.contains("check-config"), "{file}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
