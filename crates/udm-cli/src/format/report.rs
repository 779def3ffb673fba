//! A small port of libdm's column report (`libdm/libdm-report.c`), the engine behind
//! `dmsetup info -c`: fixed default widths that grow to the widest value, numbers right-aligned,
//! strings left-aligned, every field padded (the last one too), one-space separator; with
//! `--noheadings` dmsetup switches to the unaligned `:`-separated form (dmsetup.c `_report_init`,
//! "emulate old dmsetup behaviour").

/// Alignment of a column's values (headings are always left-aligned, as in libdm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Strings.
    Left,
    /// Numbers and sizes.
    Right,
}

/// One column: heading and default width as in dmsetup.c's `_report_fields` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Heading (`Name`, `Maj`, ...).
    pub heading: &'static str,
    /// Default width.
    pub width: usize,
    /// Value alignment.
    pub align: Align,
}

impl Column {
    /// A left-aligned (string) column.
    pub const fn str(heading: &'static str, width: usize) -> Column {
        Column {
            heading,
            width,
            align: Align::Left,
        }
    }

    /// A right-aligned (number) column.
    pub const fn num(heading: &'static str, width: usize) -> Column {
        Column {
            heading,
            width,
            align: Align::Right,
        }
    }
}

/// How a report is laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportStyle {
    /// Print the heading line.
    pub headings: bool,
    /// Pad fields to the column width.
    pub aligned: bool,
    /// Between fields.
    pub separator: String,
}

impl Default for ReportStyle {
    fn default() -> Self {
        ReportStyle {
            headings: true,
            aligned: true,
            separator: " ".into(),
        }
    }
}

impl ReportStyle {
    /// dmsetup's `--noheadings`: `:` separator, no alignment, no headings.
    pub fn noheadings() -> Self {
        ReportStyle {
            headings: false,
            aligned: false,
            separator: ":".into(),
        }
    }
}

/// Renders rows under columns. Nothing at all (not even headings) when there are no rows, as
/// `dm_report_output` returns early on an empty row list.
pub fn render(columns: &[Column], rows: &[Vec<String>], style: &ReportStyle) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|v| v.chars().count())
                .fold(c.width.max(c.heading.len()), usize::max)
        })
        .collect();
    let mut out = String::new();
    if style.headings {
        let cells: Vec<String> = columns
            .iter()
            .zip(&widths)
            .map(|(c, w)| {
                if style.aligned {
                    format!("{:<w$}", c.heading, w = *w)
                } else {
                    c.heading.to_string()
                }
            })
            .collect();
        out.push_str(&cells.join(&style.separator));
        out.push('\n');
    }
    for row in rows {
        let cells: Vec<String> = columns
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                let v = row.get(i).map(String::as_str).unwrap_or("");
                if !style.aligned {
                    v.to_string()
                } else if c.align == Align::Left {
                    format!("{:<w$}", v, w = *w)
                } else {
                    format!("{:>w$}", v, w = *w)
                }
            })
            .collect();
        out.push_str(&cells.join(&style.separator));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_grow_and_last_column_is_padded() {
        let cols = [Column::str("Name", 4), Column::num("N", 3)];
        let rows = vec![vec!["abcdef".into(), "7".into()]];
        assert_eq!(
            render(&cols, &rows, &ReportStyle::default()),
            "Name   N  \nabcdef   7\n"
        );
    }

    #[test]
    fn noheadings_is_colon_separated() {
        let cols = [Column::str("Name", 16), Column::num("Maj", 3)];
        let rows = vec![vec!["a".into(), "253".into()]];
        assert_eq!(render(&cols, &rows, &ReportStyle::noheadings()), "a:253\n");
    }

    #[test]
    fn empty_report_prints_nothing() {
        assert_eq!(
            render(&[Column::str("Name", 16)], &[], &ReportStyle::default()),
            ""
        );
    }
}
