// go_render renders an Ollama Go TEMPLATE the way the Ollama server does in chat ("Messages mode"),
// using only the standard library's text/template. ollama-ft uses it to prove that a Modelfile
// TEMPLATE renders exactly what the training chat template rendered.
//
// Input (stdin, JSON):
//
//	{"template": "...", "messages": [{"role": "...", "content": "..."}], "system": "..."}
//
// or, to render many conversations with one process:
//
//	{"template": "...", "batch": [{"messages": [...], "system": "..."}, ...]}
//
// Output: the rendered prompt on stdout (single), or a JSON list of {"output": "..."} /
// {"error": "..."} (batch). Errors in the template itself exit with status 2.
//
// Data model (Ollama template/template.go and server/routes.go ChatHandler):
//   - the template is parsed with missingkey=zero and the functions json, currentDate,
//     yesterdayDate and toTypeScriptType;
//   - a stored SYSTEM is prepended as a system message unless the first message is a system one;
//   - roles are lower-cased; consecutive messages with the same role (except "tool") are merged
//     with "\n\n"; .System is every system message joined with "\n\n"; system messages stay in
//     .Messages;
//   - .Response is "" and .Tools is empty. Legacy (.Prompt) templates are refused: ollama-ft only
//     writes Messages-mode templates.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type inMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type conversation struct {
	Messages []inMessage `json:"messages"`
	System   string      `json:"system"`
}

type request struct {
	Template string         `json:"template"`
	Messages []inMessage    `json:"messages"`
	System   string         `json:"system"`
	Batch    []conversation `json:"batch"`
}

type toolCallFunction struct {
	Index     int
	Name      string
	Arguments map[string]any
}

type toolCall struct {
	ID       string
	Function toolCallFunction
}

// message mirrors the fields Ollama exposes to templates for each message.
type message struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []toolCall
	ToolName   string
	ToolCallID string
}

type result struct {
	Output *string `json:"output,omitempty"`
	Error  string  `json:"error,omitempty"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v any) string {
		return "any"
	},
}

// identifiers collects field and variable names the way Ollama decides between Messages mode and
// legacy mode (it also refuses {{ template "x" }} calls without an argument).
func identifiers(n parse.Node) ([]string, error) {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			got, err := identifiers(c)
			if err != nil {
				return nil, err
			}
			names = append(names, got...)
		}
		return names, nil
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return nil, fmt.Errorf("undefined template specified")
		}
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		return identifiers(n.Pipe)
	case *parse.IfNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.RangeNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.WithNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.PipeNode:
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				got, err := identifiers(a)
				if err != nil {
					return nil, err
				}
				names = append(names, got...)
			}
		}
		return names, nil
	case *parse.FieldNode:
		return n.Ident, nil
	case *parse.VariableNode:
		return n.Ident, nil
	}
	return nil, nil
}

func branchIdentifiers(b *parse.BranchNode) ([]string, error) {
	names, err := identifiers(b.Pipe)
	if err != nil {
		return nil, err
	}
	for _, l := range []*parse.ListNode{b.List, b.ElseList} {
		if l != nil {
			got, err := identifiers(l)
			if err != nil {
				return nil, err
			}
			names = append(names, got...)
		}
	}
	return names, nil
}

func usesMessages(t *template.Template) (bool, error) {
	for _, tt := range t.Templates() {
		if tt.Tree == nil {
			continue
		}
		for _, n := range tt.Root.Nodes {
			names, err := identifiers(n)
			if err != nil {
				return false, err
			}
			for _, name := range names {
				if strings.ToLower(name) == "messages" {
					return true, nil
				}
			}
		}
	}
	return false, nil
}

// collate merges consecutive same-role messages and joins the system messages, as Ollama does.
func collate(msgs []inMessage) (string, []*message) {
	var system []string
	var out []*message
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &message{Role: m.Role, Content: m.Content})
		}
	}
	return strings.Join(system, "\n\n"), out
}

func render(t *template.Template, c conversation) (string, error) {
	msgs := make([]inMessage, 0, len(c.Messages)+1)
	for _, m := range c.Messages {
		msgs = append(msgs, inMessage{Role: strings.ToLower(m.Role), Content: m.Content})
	}
	if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]inMessage{{Role: "system", Content: c.System}}, msgs...)
	}
	system, collated := collate(msgs)
	var b strings.Builder
	err := t.Execute(&b, map[string]any{
		"System":     system,
		"Messages":   collated,
		"Tools":      []any(nil),
		"Response":   "",
		"Think":      false,
		"ThinkLevel": "",
		"IsThinkSet": false,
	})
	return b.String(), err
}

func fail(code int, format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(code)
}

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(2, "reading stdin: %v", err)
	}
	var req request
	if err := json.Unmarshal(data, &req); err != nil {
		fail(2, "input is not valid JSON: %v", err)
	}
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		fail(2, "template error: %v", err)
	}
	ok, err := usesMessages(t)
	if err != nil {
		fail(2, "template error: %v", err)
	}
	if !ok {
		fail(2, "template does not use .Messages; only Messages-mode templates are supported")
	}
	if req.Batch == nil {
		out, err := render(t, conversation{Messages: req.Messages, System: req.System})
		if err != nil {
			fail(1, "render error: %v", err)
		}
		os.Stdout.WriteString(out)
		return
	}
	results := make([]result, len(req.Batch))
	for i, c := range req.Batch {
		out, err := render(t, c)
		if err != nil {
			results[i] = result{Error: err.Error()}
		} else {
			s := out
			results[i] = result{Output: &s}
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(results); err != nil {
		fail(2, "writing output: %v", err)
	}
}
