//! One list of blocks, two renderings: Markdown (`report.md`) and a self-contained HTML page with
//! the figures inlined (`report.html`), so the two always say the same thing.

use super::*;

/// A piece of a report.
#[derive(Clone, Debug)]
pub enum Block {
    Heading(usize, String),
    Para(String),
    List(Vec<String>),
    Table {
        head: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    /// An SVG figure: written to `figures/<file>` and linked from the Markdown; inlined in the
    /// HTML.
    Figure {
        file: String,
        svg: String,
        caption: String,
    },
    Code(String),
}

/// Markdown text of `blocks`.
pub fn markdown(blocks: &[Block]) -> String {
    let mut s = String::new();
    for b in blocks {
        match b {
            Block::Heading(l, t) => s.push_str(&format!("{} {t}\n\n", "#".repeat(*l))),
            Block::Para(t) => s.push_str(&format!("{t}\n\n")),
            Block::List(items) => {
                for i in items {
                    s.push_str(&format!("- {i}\n"));
                }
                s.push('\n');
            }
            Block::Table { head, rows } => {
                let cell = |c: &str| c.replace('|', "\\|");
                s.push_str(&format!(
                    "| {} |\n|{}\n",
                    head.iter().map(|h| cell(h)).collect::<Vec<_>>().join(" | "),
                    "---|".repeat(head.len())
                ));
                for r in rows {
                    s.push_str(&format!(
                        "| {} |\n",
                        r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
                    ));
                }
                s.push('\n');
            }
            Block::Figure { file, caption, .. } => {
                s.push_str(&format!("![{caption}](figures/{file})\n\n*{caption}*\n\n"))
            }
            Block::Code(t) => s.push_str(&format!("```\n{t}\n```\n\n")),
        }
    }
    s
}

pub(super) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Inline Markdown of our own paragraphs: `code` and **bold** only.
pub(super) fn inline(s: &str) -> String {
    let mut out = String::new();
    let e = esc(s);
    let mut code = false;
    for (i, part) in e.split('`').enumerate() {
        if i > 0 {
            out.push_str(if code { "</code>" } else { "<code>" });
            code = !code;
        }
        if code {
            out.push_str(part);
        } else {
            let mut bold = false;
            for (j, p) in part.split("**").enumerate() {
                if j > 0 {
                    out.push_str(if bold { "</b>" } else { "<b>" });
                    bold = !bold;
                }
                out.push_str(p);
            }
            if bold {
                out.push_str("</b>");
            }
        }
    }
    if code {
        out.push_str("</code>");
    }
    out
}

/// A self-contained HTML page of `blocks`.
pub fn html(title: &str, blocks: &[Block]) -> String {
    let mut s = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;\
line-height:1.45;color:#222}}table{{border-collapse:collapse;margin:1em 0;font-size:0.9em}}\
th,td{{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left}}th{{background:#f3f3f3}}\
pre{{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:0.85em}}\
figure{{margin:1.5em 0}}figcaption{{font-style:italic;color:#555}}\
</style></head><body>\n",
        esc(title)
    );
    for b in blocks {
        match b {
            Block::Heading(l, t) => s.push_str(&format!("<h{l}>{}</h{l}>\n", inline(t))),
            Block::Para(t) => s.push_str(&format!("<p>{}</p>\n", inline(t))),
            Block::List(items) => {
                s.push_str("<ul>\n");
                for i in items {
                    s.push_str(&format!("<li>{}</li>\n", inline(i)));
                }
                s.push_str("</ul>\n");
            }
            Block::Table { head, rows } => {
                s.push_str("<table><thead><tr>");
                for h in head {
                    s.push_str(&format!("<th>{}</th>", inline(h)));
                }
                s.push_str("</tr></thead><tbody>\n");
                for r in rows {
                    s.push_str("<tr>");
                    for c in r {
                        s.push_str(&format!("<td>{}</td>", inline(c)));
                    }
                    s.push_str("</tr>\n");
                }
                s.push_str("</tbody></table>\n");
            }
            Block::Figure { svg, caption, .. } => s.push_str(&format!(
                "<figure>{svg}<figcaption>{}</figcaption></figure>\n",
                esc(caption)
            )),
            Block::Code(t) => s.push_str(&format!("<pre>{}</pre>\n", esc(t))),
        }
    }
    s.push_str("</body></html>\n");
    s
}

/// Write `report.md`, `report.html` and `figures/*.svg` into `out`.
pub fn write(title: &str, blocks: &[Block], out: &Path) -> Result<()> {
    let figs = out.join("figures");
    for b in blocks {
        if let Block::Figure { file, svg, .. } = b {
            std::fs::create_dir_all(&figs)
                .map_err(|e| crate::Error::file(&figs, format!("cannot create directory: {e}")))?;
            write_atomic(&figs.join(file), svg.as_bytes())?;
        }
    }
    write_atomic(&out.join("report.md"), markdown(blocks).as_bytes())?;
    write_atomic(&out.join("report.html"), html(title, blocks).as_bytes())?;
    Ok(())
}
